//! Shared fixture for the integration tests in `tests/tests/`.
