//! PTX of kernels/*.cu embedded by build.rs.
