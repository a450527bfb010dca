//! Library kernels (in progress).
