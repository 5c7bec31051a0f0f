//! Fuzz target `lean_head`: see `checks::lean_head`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        sse_gateway_fuzz::checks::lean_head(data);
    });
}
