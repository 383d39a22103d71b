//! skyhold-core
