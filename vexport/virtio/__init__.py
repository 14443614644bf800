"""Pure virtio core: memory (IOVA regions), split virtqueue, virtio-blk, FakeDriver.

No asyncio, mmap, fcntl or cffi here; see vexport.kernel.vduse for the kernel side.
"""
