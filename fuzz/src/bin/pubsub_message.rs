//! Fuzz target `pubsub_message`: see `checks::pubsub_message`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        sse_gateway_fuzz::checks::pubsub_message(data);
    });
}
