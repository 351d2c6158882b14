//! Nothing is tuned to the fixture's config: other tiny SD1.x configs (other widths, block counts,
//! head lists, linear projections, deeper transformers, a shorter text encoder, another VAE
//! scale factor) are built with random weights, written in diffusers layout, loaded through the
//! same loader and checked for what must hold on any config.
