//! Fuzz target `publish_body`: see `checks::publish_body`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        sse_gateway_fuzz::checks::publish_body(data);
    });
}
