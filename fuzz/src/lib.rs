//! The properties the fuzz targets check (`checks`), shared with the corpus replay of the
//! gateway's own test suite.

pub mod checks;
