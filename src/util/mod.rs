//! Small helpers every layer uses: atomic file writes, image files and tensors, seeded noise,
//! text drawn into images.

pub(crate) mod fs;
pub(crate) mod image_io;
pub(crate) mod mapped;
pub(crate) mod memory;
pub(crate) mod names;
pub(crate) mod noise;
pub(crate) mod plot;
pub(crate) mod resize;
pub(crate) mod tensors;
pub(crate) mod text_render;

// What the tests, the binary and a library user reach (the files are the crate's own).
pub use image_io::{load_folder, load_folder_images, load_masks, square_crop};
pub use mapped::{in_place_available, MappedAlloc};
pub use noise::{normal, seeded_noise};
