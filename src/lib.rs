pub mod crypto;
pub mod secmem;
