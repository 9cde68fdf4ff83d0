//! Golden tests for the translation of reference-system submissions: every case in
//! `tests/reference/cases.json` is translated and rendered (cq's normalised definition and
//! namespace, or the refusal), and the rendering is pinned in `tests/reference/translated.txt`.
//! Run with `UPDATE_EXPECT=1` to accept an intended change, then read the diff.

use expect_test::expect_file;
use protocol::definition::parse_json;
use protocol::reference::{Submission, translate_submission};
use serde_json::Value;

#[test]
fn reference_submissions_translate_to_cq_definitions() {
    let cases: Vec<Value> = serde_json::from_str(include_str!("reference/cases.json")).unwrap();
    let mut out = String::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let bytes = serde_json::to_vec(&case["submission"]).unwrap();
        out.push_str(&format!("## {name}\n"));
        let result = parse_json::<Submission>(&bytes).and_then(translate_submission);
        match result {
            Ok(t) => {
                let def = serde_json::to_string_pretty(&t.definition).unwrap();
                out.push_str(&format!("namespace: {:?}\njobId: {}\n{def}\n\n", t.namespace, t.definition.job_id()));
            }
            Err(e) => out.push_str(&format!("refused: `{}`: {}\n\n", e.field, e.message)),
        }
    }
    expect_file!["reference/translated.txt"].assert_eq(&out);
}

#[test]
fn a_translated_definition_has_the_id_of_the_same_cq_definition() {
    let reference = br#"{"definition":{"image":"busybox","command":"cat /inputs/a","inputs":{"a":{"value":"x"}}}}"#;
    let translated = translate_submission(parse_json::<Submission>(reference).unwrap()).unwrap();
    let native: protocol::JobDefinition =
        parse_json(br#"{"image":"busybox","command":["cat","/inputs/a"],"inputs":{"a":{"type":"text","value":"x"}}}"#)
            .unwrap();
    assert_eq!(translated.definition.job_id(), native.normalize().unwrap().job_id());
}
