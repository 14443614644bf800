/* Cost of switching a CPU between two tasks, and of the memory touched after a switch.
 *
 * Two tasks pinned to CPU 0 pass a byte back and forth through two pipes ROUNDS times;
 * on each turn a task writes one byte in each of PAGES private pages of its own.  The
 * tasks are two threads of one process (no address-space switch) or two processes (an
 * address-space switch at every hand-over).  Prints the time per round trip.
 *
 *     switch_cost thread|proc PAGES ROUNDS
 *
 * Built and run by bench/switch_cost.py.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int pages, rounds;
static int to_b[2], to_a[2];

static void run_side(int in, int out, int starts)
{
    size_t size = (size_t)(pages > 0 ? pages : 1) * 4096;
    char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    cpu_set_t one;
    char token = 0;

    if (mem == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    CPU_ZERO(&one);
    CPU_SET(0, &one);
    if (sched_setaffinity(0, sizeof(one), &one) != 0) {
        perror("sched_setaffinity");
        exit(1);
    }
    for (int turn = 0; turn < rounds; turn++) {
        if ((!starts || turn > 0) && read(in, &token, 1) != 1)
            exit(1);
        for (int p = 0; p < pages; p++)
            mem[(size_t)p * 4096 + (turn & 63)] += 1;
        if (write(out, &token, 1) != 1)
            exit(1);
    }
}

static void *second_thread(void *unused)
{
    (void)unused;
    run_side(to_b[0], to_a[1], 0);
    return NULL;
}

int main(int argc, char **argv)
{
    struct timespec t0, t1;
    int processes;
    char last;

    if (argc != 4 || (strcmp(argv[1], "thread") && strcmp(argv[1], "proc"))) {
        fprintf(stderr, "usage: %s thread|proc PAGES ROUNDS\n", argv[0]);
        return 2;
    }
    processes = strcmp(argv[1], "proc") == 0;
    pages = atoi(argv[2]);
    rounds = atoi(argv[3]);
    if (pipe(to_b) || pipe(to_a)) {
        perror("pipe");
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (processes) {
        pid_t child = fork();
        if (child == 0) {
            run_side(to_b[0], to_a[1], 0);
            _exit(0);
        }
        run_side(to_a[0], to_b[1], 1);
        if (read(to_a[0], &last, 1) != 1)
            return 1;
        waitpid(child, NULL, 0);
    } else {
        pthread_t other;
        pthread_create(&other, NULL, second_thread, NULL);
        run_side(to_a[0], to_b[1], 1);
        if (read(to_a[0], &last, 1) != 1)
            return 1;
        pthread_join(other, NULL);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%s %d %.2f\n", argv[1], pages,
           ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / 1e3 / rounds);
    return 0;
}
