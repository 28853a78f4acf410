//! Heads that sparse encoders and rerankers put on an encoder's hidden states. They
//! know no architecture: the encoder under them comes from the dispatch.

pub(super) mod classifier;
pub(super) mod mlm;
pub(super) mod sparse_linear;
pub(super) mod yes_no;
