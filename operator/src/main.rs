//! The `xpyd-operator` binary.

fn main() {
    eprintln!("xpyd-operator: the reconciler is not built yet");
    std::process::exit(2);
}
