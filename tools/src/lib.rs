//! Offline admin tools over the engine.
