//! What each subcommand does, from parsed flags to output.

pub mod generate;
