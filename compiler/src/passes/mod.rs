//! Graph passes: plain functions `fn(&mut Graph) -> Result<Report>`, each a
//! small unit that can be run, tested and reported on its own.

pub mod fusion;
pub mod lipschitz;
pub mod shapes;

pub use lipschitz::{certify, LipschitzReport};
pub use shapes::infer_shapes;
