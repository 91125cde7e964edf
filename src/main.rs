mod consul;
mod duration;
mod error;
mod plan;
mod tree;
mod version_name;

fn main() {}
