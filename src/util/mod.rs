//! Small helpers every layer uses: atomic file writes, image files and tensors, seeded noise,
//! text drawn into images.

pub mod fs;
pub mod image_io;
pub mod mapped;
pub mod memory;
pub mod names;
pub mod noise;
pub mod plot;
pub mod resize;
pub mod tensors;
pub mod text_render;
