//! Any bytes as a publish request: decoding and the envelope checks never panic,
//! and an accepted envelope passes the checks again unchanged.
#![no_main]

use evmesh_node::Limits;
use evmesh_node::envelope;
use evmesh_proto::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = pb::PublishRequest::decode(data) else {
        return;
    };
    let limits = Limits::default();
    if let Ok(accepted) = envelope::accept(request.event, &limits) {
        let again = envelope::accept(Some(accepted.clone()), &limits)
            .expect("an accepted envelope is accepted again");
        assert_eq!(
            again, accepted,
            "accepting a filled envelope changes nothing"
        );
    }
});
