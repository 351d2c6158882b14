//! Small helpers every layer uses: image files and tensors, text drawn into images.

pub mod image_io;
pub mod text_render;
