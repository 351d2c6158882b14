//! The paper's metrics: latent Fisher divergence and the Gaussian 2-Wasserstein distance
//! (overfitting), and CLIP-T, CLIP-I and DINO-I (customization quality).

pub mod clip;
pub mod dino;
pub mod fisher;
pub mod preprocess;
pub mod w2;
