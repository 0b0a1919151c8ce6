/// mimalloc: thread-local heaps instead of glibc's contended arenas. Thousands of parked
/// blocking queries answered at once allocate and free in bursts on every worker; with glibc's
/// malloc that was a fifth of the CPU of a fan-out.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(trellis::cli::main());
}
