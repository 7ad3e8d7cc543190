//! The one transformer definition, written against `Backend`.
