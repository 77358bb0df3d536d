//! Real registry clients against a running server.
