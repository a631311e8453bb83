"""C++ sources of the native CPU ops (compiled on first use by ``adtuning.native``)."""
