//! GGUF block formats: dequantization of rows (owned by the GGUF work item).
