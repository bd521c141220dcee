"""pytracer: the kernel's TCP socket lifecycle, traced with eBPF."""

__version__ = "0.1.0"
