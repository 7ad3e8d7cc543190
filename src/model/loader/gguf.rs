//! GGUF files (owned by the GGUF work item; see issue 2).
use std::path::Path;

use super::LoadedModel;
use crate::model::LoadError;

/// True when the file starts with the GGUF magic.
pub fn has_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok()
        && &magic == b"GGUF"
}

pub fn load_gguf(path: &Path) -> Result<LoadedModel, LoadError> {
    Err(LoadError::invalid(path, "GGUF loading not implemented yet"))
}
