//! The paper's metrics: latent Fisher divergence and the Gaussian 2-Wasserstein distance
//! (overfitting), and CLIP-T, CLIP-I and DINO-I (customization quality).

pub mod chart;
pub mod clip;
pub mod curves;
pub mod dino;
pub mod eval;
pub mod fisher;
pub mod preprocess;
pub mod scores;
pub mod w2;
