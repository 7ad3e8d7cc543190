//! Weights of the transformer, each field with its shape.
