//! tether's gRPC contracts. The Rust code is generated from the `.proto` files beside
//! `src/` and checked in under `src/gen/`, so building needs no `protoc`;
//! `tests/bootstrap.rs` regenerates it and fails when the checked-in copy is stale.

pub mod shard {
    pub mod v1 {
        include!("gen/tether.shard.v1.rs");
    }
}

pub mod worker {
    pub mod v1 {
        include!("gen/tether.worker.v1.rs");
    }
}
