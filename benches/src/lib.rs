//! Shared pieces of the bench binaries.

use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

fn lines(path: &Path) -> Result<Vec<Value>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::BufReader::new(f).lines().map(|l| Ok(serde_json::from_str(&l?)?)).collect()
}

/// A FAQ of `entries` rows and its queries: the evaluation sets of `datasets`
/// (`stackfaq`, `bq`; see `../shared/datasets/README.md`) — BQ's answerless entries
/// answered with their question — plus generated bilingual customer-service entries up
/// to `entries`. The queries are the evaluation sets' queries.
pub fn faq_corpus(datasets: &Path, entries: usize) -> Result<(Vec<Value>, Vec<String>)> {
    let (mut faq, mut queries) = (Vec::new(), Vec::new());
    for set in ["stackfaq", "bq"] {
        for mut e in lines(&datasets.join(set).join("faq.jsonl"))? {
            if e["answer"].as_str().is_none_or(str::is_empty) {
                e["answer"] = e["question"].clone();
            }
            faq.push(e);
        }
        queries.extend(
            lines(&datasets.join(set).join("queries.jsonl"))?
                .into_iter()
                .filter_map(|q| q["query"].as_str().map(str::to_string)),
        );
    }
    // Generated entries: recombined customer-service phrases, Chinese and English.
    let zh_items = ["订单", "退款", "发票", "快递", "会员", "优惠券", "积分", "账号", "手机", "耳机", "冰箱", "外套"];
    let zh_verbs = ["怎么取消", "多久到账", "如何修改", "为什么失败", "能否退换", "在哪里查询", "需要多久", "怎么申请"];
    let en_items =
        ["order", "refund", "invoice", "parcel", "membership", "coupon", "points", "account", "laptop", "jacket"];
    let en_verbs = ["cancel", "track", "change", "return", "renew", "apply for", "pay for", "replace"];
    let mut i = 0usize;
    while faq.len() < entries {
        let e = if i.is_multiple_of(2) {
            let (a, b) = (zh_items[i % zh_items.len()], zh_verbs[(i / 7) % zh_verbs.len()]);
            json!({"id": format!("g{i}"), "question": format!("第{i}号{a}{b}？"), "answer": format!("关于{a}：请在我的订单页面操作，编号{i}。"), "lang": "zh"})
        } else {
            let (a, b) = (en_items[i % en_items.len()], en_verbs[(i / 7) % en_verbs.len()]);
            json!({"id": format!("g{i}"), "question": format!("How do I {b} my {a} number {i}?"), "answer": format!("To {b} your {a}, open My Orders; reference {i}."), "lang": "en"})
        };
        faq.push(e);
        i += 1;
    }
    Ok((faq, queries))
}
