//! The webhook sent on each new approval. (Being written.)
