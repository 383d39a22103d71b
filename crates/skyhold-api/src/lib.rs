//! skyhold-api
