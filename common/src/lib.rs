//! Shared types for spin-diffusion: no burn here.
