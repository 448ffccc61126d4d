//! MLflow's search grammar, parsed into typed filters and orderings: the
//! `filter` and `order_by` strings of runs/search and experiments/search, and
//! the opaque page tokens. Pure and unit-tested; no SQL here (the store turns
//! these types into queries).
//!
//! MLflow parses filters with `sqlparse`; this is a small tokenizer that
//! accepts the same language (`AND`-joined comparisons, no `OR`) and answers
//! MLflow's error messages for the usual mistakes. Where MLflow prints a
//! Python set (whose order changes from run to run), the order here is fixed.
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

/// A malformed filter, order_by or page token: MLflow's INVALID_PARAMETER_VALUE message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SearchError(pub String);

type Result<T> = std::result::Result<T, SearchError>;

fn err<T>(message: impl Into<String>) -> Result<T> {
    Err(SearchError(message.into()))
}

// ---------------------------------------------------------------------------
// Tokens

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// A `'single quoted'` string, raw (with its quotes).
    Str(String),
    /// A number, raw; `true` when it is an integer.
    Num(String, bool),
    /// An identifier (`metrics.acc`, `` tags.`a b` ``, `"x"`), raw.
    Ident(String),
    /// A comparison operator (`=`, `!=`, `LIKE`, ...) as written.
    Op(String),
    /// AND, OR, NOT, IN, IS, NULL (upper-cased), with the raw text.
    Kw(&'static str, String),
    /// A parenthesised group, raw.
    Paren(String),
    /// Anything else (one character).
    Other(String),
}

impl Tok {
    fn raw(&self) -> &str {
        match self {
            Tok::Str(s)
            | Tok::Num(s, _)
            | Tok::Ident(s)
            | Tok::Op(s)
            | Tok::Kw(_, s)
            | Tok::Paren(s)
            | Tok::Other(s) => s,
        }
    }
}

fn is_name_start(c: char) -> bool {
    c.is_alphabetic() || c == '_'
}

fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

/// Length in bytes of a quoted run starting at `s[0]` (the quote), or `None`
/// when it is not terminated. `''` inside single quotes is an escaped quote.
fn quoted_len(s: &str, quote: char) -> Option<usize> {
    let mut chars = s.char_indices().skip(1).peekable();
    while let Some((i, c)) = chars.next() {
        if c == quote {
            if quote == '\'' && chars.peek().map(|(_, c)| *c) == Some('\'') {
                chars.next();
                continue;
            }
            return Some(i + c.len_utf8());
        }
    }
    None
}

/// Length of a number at the start of `s` (`-?digits[.digits][e[+-]digits]`
/// or `-?.digits...`), and whether it is an integer.
fn number_len(s: &str) -> Option<(usize, bool)> {
    let b = s.as_bytes();
    let mut i = 0;
    if b.first() == Some(&b'-') {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = i - int_start;
    let mut integer = true;
    if i < b.len() && b[i] == b'.' {
        let frac_start = i + 1;
        let mut j = frac_start;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if int_digits == 0 && j == frac_start {
            return None;
        }
        i = j;
        integer = false;
    } else if int_digits == 0 {
        return None;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        let mut j = i + 1;
        if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
            j += 1;
        }
        let exp_start = j;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if j > exp_start {
            i = j;
            integer = false;
        }
    }
    // `1abc` is not a number followed by a name.
    if s[i..].chars().next().is_some_and(is_name_char) {
        return None;
    }
    Some((i, integer))
}

/// One part of an identifier: a bare name, or a backtick/double-quoted name.
fn ident_part_len(s: &str) -> Option<usize> {
    let c = s.chars().next()?;
    if c == '`' || c == '"' {
        return quoted_len(s, c);
    }
    if !is_name_start(c) {
        return None;
    }
    Some(s.find(|c: char| !is_name_char(c)).unwrap_or(s.len()))
}

/// Splits a filter into tokens, dropping whitespace.
fn tokenize(s: &str) -> Vec<Tok> {
    let mut out = vec![];
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        let c = rest.chars().next().expect("non-empty");
        if c.is_whitespace() {
            i += c.len_utf8();
            continue;
        }
        if c == '\'' {
            if let Some(n) = quoted_len(rest, '\'') {
                out.push(Tok::Str(rest[..n].to_string()));
                i += n;
                continue;
            }
            out.push(Tok::Other("'".into()));
            i += 1;
            continue;
        }
        if c == '(' {
            // A parenthesised group, up to the matching parenthesis (outside quotes).
            let mut depth = 0;
            let mut j = 0;
            let mut end = None;
            while j < rest.len() {
                let ch = rest[j..].chars().next().expect("in bounds");
                match ch {
                    '\'' | '"' | '`' => match quoted_len(&rest[j..], ch) {
                        Some(n) => {
                            j += n;
                            continue;
                        }
                        None => break,
                    },
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(j + 1);
                            break;
                        }
                    }
                    _ => {}
                }
                j += ch.len_utf8();
            }
            let n = end.unwrap_or(rest.len());
            out.push(Tok::Paren(rest[..n].to_string()));
            i += n;
            continue;
        }
        if let Some((n, integer)) = number_len(rest) {
            // `-` starts a number only where a value may stand.
            if c != '-' || !matches!(out.last(), Some(Tok::Ident(_) | Tok::Num(..) | Tok::Str(_))) {
                out.push(Tok::Num(rest[..n].to_string(), integer));
                i += n;
                continue;
            }
        }
        if let Some(op) = [">=", "<=", "!=", "<>", "==", "=", "<", ">"]
            .into_iter()
            .find(|op| rest.starts_with(op))
        {
            out.push(Tok::Op(op.into()));
            i += op.len();
            continue;
        }
        if let Some(mut n) = ident_part_len(rest) {
            // Join `a.b.`c`` parts.
            while rest[n..].starts_with('.') {
                match ident_part_len(&rest[n + 1..]) {
                    Some(m) => n += 1 + m,
                    None => break,
                }
            }
            let raw = &rest[..n];
            let upper = raw.to_ascii_uppercase();
            let tok = match upper.as_str() {
                "AND" => Tok::Kw("AND", raw.into()),
                "OR" => Tok::Kw("OR", raw.into()),
                "NOT" => Tok::Kw("NOT", raw.into()),
                "IN" => Tok::Kw("IN", raw.into()),
                "IS" => Tok::Kw("IS", raw.into()),
                "NULL" => Tok::Kw("NULL", raw.into()),
                "LIKE" | "ILIKE" => Tok::Op(raw.into()),
                _ => Tok::Ident(raw.into()),
            };
            out.push(tok);
            i += n;
            continue;
        }
        out.push(Tok::Other(c.to_string()));
        i += c.len_utf8();
    }
    out
}

// ---------------------------------------------------------------------------
// Comparisons (MLflow's `parse_search_filter` output)

/// The right-hand side of a parsed comparison.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A numeric literal as written (metrics keep it as text, like MLflow).
    Number(String),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<String>),
    /// `IS NULL` / `IS NOT NULL`.
    None,
}

/// What a comparison's identifier names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entity {
    Metric,
    Param,
    Tag,
    Attribute,
    Dataset,
}

impl Entity {
    fn mlflow_name(self) -> &'static str {
        match self {
            Entity::Metric => "metric",
            Entity::Param => "parameter",
            Entity::Tag => "tag",
            Entity::Attribute => "attribute",
            Entity::Dataset => "dataset",
        }
    }
}

/// One parsed comparison: `entity.key comparator value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub entity: Entity,
    pub key: String,
    /// As written, except `IS NULL`, `IS NOT NULL`, `NOT IN` (upper case).
    pub comparator: String,
    pub value: Value,
}

/// Which search a filter belongs to (identifiers and attributes differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grammar {
    Runs,
    Experiments,
}

const RUN_SEARCH_ATTRIBUTES: &[&str] = &[
    "run_id",
    "run_name",
    "status",
    "start_time",
    "end_time",
    "artifact_uri",
    "user_id",
    "created",
    "Created",
    "run name",
    "Run name",
    "Run Name",
];
const RUN_ORDER_ATTRIBUTES: &[&str] = &[
    "run_id",
    "run_name",
    "status",
    "start_time",
    "end_time",
    "artifact_uri",
    "user_id",
    "created",
    "Created",
];
const RUN_NUMERIC_ATTRIBUTES: &[&str] = &["start_time", "end_time", "created", "Created"];
const EXPERIMENT_ATTRIBUTES: &[&str] = &["name", "experiment_id", "creation_time", "last_update_time"];
const EXPERIMENT_NUMERIC_ATTRIBUTES: &[&str] = &["creation_time", "last_update_time"];
const DATASET_ATTRIBUTES: &[&str] = &["name", "digest", "context"];

const METRIC_COMPARATORS: &[&str] = &[">", ">=", "!=", "=", "<", "<="];
const PARAM_COMPARATORS: &[&str] = &["!=", "=", "LIKE", "ILIKE", "IS NULL", "IS NOT NULL"];
const STRING_ATTRIBUTE_COMPARATORS: &[&str] = &["!=", "=", "LIKE", "ILIKE", "IN", "NOT IN"];

/// A Python-style set literal of `items` (fixed order).
fn py_set(items: &[&str]) -> String {
    let inner: Vec<String> = items.iter().map(|s| format!("'{s}'")).collect();
    format!("{{{}}}", inner.join(", "))
}

fn is_quoted(s: &str, q: char) -> bool {
    s.len() >= 2 && s.starts_with(q) && s.ends_with(q)
}

fn trim_ends(s: &str) -> &str {
    &s[1..s.len() - 1]
}

fn trim_backticks(s: &str) -> &str {
    if is_quoted(s, '`') { trim_ends(s) } else { s }
}

/// MLflow's `_strip_quotes`.
fn strip_quotes(s: &str, expect_quoted: bool) -> Result<String> {
    if is_quoted(s, '\'') || is_quoted(s, '"') {
        Ok(trim_ends(s).to_string())
    } else if expect_quoted {
        err(format!(
            "Parameter value is either not quoted or unidentified quote types used for string value {s}. \
             Use either single or double quotes."
        ))
    } else {
        Ok(s.to_string())
    }
}

fn entity_of(grammar: Grammar, entity: &str) -> Result<Entity> {
    let trimmed = trim_backticks(entity);
    if grammar == Grammar::Experiments && !["attribute", "tag", "tags"].contains(&entity) {
        return err(format!(
            "Invalid entity type '{entity}'. Valid entity types are ('attribute', 'tag', 'tags')"
        ));
    }
    Ok(match trimmed {
        "metric" | "metrics" => Entity::Metric,
        "parameter" | "parameters" | "param" | "params" => Entity::Param,
        "tag" | "tags" => Entity::Tag,
        "attribute" | "attributes" | "attr" | "run" => Entity::Attribute,
        "dataset" | "datasets" => Entity::Dataset,
        _ => {
            return err(format!(
                "Invalid entity type '{trimmed}'. Valid values are ['metric', 'parameter', 'tag', 'attribute', 'dataset']"
            ));
        }
    })
}

/// MLflow's `_get_identifier`: `entity.key` (or a bare attribute key).
fn identifier(grammar: Grammar, ident: &str, valid_attributes: &[&str]) -> Result<(Entity, String)> {
    let (entity, key) = match ident.split_once('.') {
        None => (Entity::Attribute, ident),
        Some((entity, key)) => (entity_of(grammar, entity)?, key),
    };
    let key = trim_backticks(&strip_quotes(key, false)?).to_string();
    if entity == Entity::Attribute && !valid_attributes.contains(&key.as_str()) {
        return err(format!(
            "Invalid attribute key '{key}' specified. Valid keys are '{}'",
            py_set(valid_attributes)
        ));
    }
    if entity == Entity::Dataset && !DATASET_ATTRIBUTES.contains(&key.as_str()) {
        return err(format!(
            "Invalid dataset key '{key}' specified. Valid keys are '{}'",
            py_set(DATASET_ATTRIBUTES)
        ));
    }
    Ok((entity, key))
}

/// Parses `('a', "b")` into its strings (MLflow's `_parse_list_from_sql_token`).
fn parse_list(paren: &str) -> Result<Vec<String>> {
    let ill_formed = || {
        SearchError(
            "While parsing a list in the query, expected a non-empty list of string values, but got ill-formed list."
                .into(),
        )
    };
    if !paren.ends_with(')') {
        return Err(ill_formed());
    }
    let inner = paren[1..paren.len() - 1].trim();
    let mut items = vec![];
    let mut other_type = false;
    let mut rest = inner;
    while !rest.is_empty() {
        let c = rest.chars().next().expect("non-empty");
        if c == '\'' || c == '"' {
            let n = quoted_len(rest, c).ok_or_else(ill_formed)?;
            items.push(rest[1..n - 1].to_string());
            rest = rest[n..].trim_start();
        } else {
            let n = rest.find(',').unwrap_or(rest.len());
            let item = rest[..n].trim();
            if item.is_empty() || number_len(item).is_none_or(|(len, _)| len != item.len()) {
                return Err(ill_formed());
            }
            other_type = true;
            items.push(item.to_string());
            rest = &rest[n..];
        }
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
        } else if !rest.is_empty() {
            return Err(ill_formed());
        }
    }
    if items.is_empty() {
        return err(
            "While parsing a list in the query, expected a non-empty list of string values, but got empty list",
        );
    }
    if other_type {
        return err(format!(
            "While parsing a list in the query, expected string value, punctuation, or whitespace, \
             but got different type in list: {paren}"
        ));
    }
    Ok(items)
}

/// MLflow's `_get_value`.
fn value_of(grammar: Grammar, entity: Entity, key: &str, tok: &Tok) -> Result<Value> {
    let string_like = matches!(tok, Tok::Str(_) | Tok::Ident(_));
    match entity {
        Entity::Metric => match tok {
            Tok::Num(raw, _) => Ok(Value::Number(raw.clone())),
            _ => err(format!("Expected numeric value type for metric. Found {}", tok.raw())),
        },
        Entity::Param | Entity::Tag => {
            if string_like {
                Ok(Value::Str(strip_quotes(tok.raw(), true)?))
            } else {
                err(format!(
                    "Expected a quoted string value for {} (e.g. 'my-value'). Got value {}",
                    entity.mlflow_name(),
                    tok.raw()
                ))
            }
        }
        Entity::Attribute => {
            let numeric = match grammar {
                Grammar::Runs => RUN_NUMERIC_ATTRIBUTES,
                Grammar::Experiments => EXPERIMENT_NUMERIC_ATTRIBUTES,
            };
            if numeric.contains(&key) {
                return match tok {
                    Tok::Num(raw, true) => raw
                        .parse::<i64>()
                        .map(Value::Int)
                        .or_else(|_| raw.parse::<f64>().map(Value::Float))
                        .map_err(|_| {
                            SearchError(format!(
                                "Expected numeric value type for numeric attribute: {key}. Found {raw}"
                            ))
                        }),
                    Tok::Num(raw, false) => raw.parse::<f64>().map(Value::Float).map_err(|_| {
                        SearchError(format!(
                            "Expected numeric value type for numeric attribute: {key}. Found {raw}"
                        ))
                    }),
                    _ => err(format!(
                        "Expected numeric value type for numeric attribute: {key}. Found {}",
                        tok.raw()
                    )),
                };
            }
            match tok {
                _ if string_like => Ok(Value::Str(strip_quotes(tok.raw(), true)?)),
                Tok::Paren(raw) => {
                    let supported = match grammar {
                        Grammar::Runs => "run_id",
                        Grammar::Experiments => "experiment_id",
                    };
                    if key != supported {
                        return err(format!(
                            "Only ['{supported}'] attributes support comparison with a list of quoted string values."
                        ));
                    }
                    Ok(Value::List(parse_list(raw)?))
                }
                _ => err(format!(
                    "Expected a quoted string value for attributes. Got value {}",
                    tok.raw()
                )),
            }
        }
        Entity::Dataset => match tok {
            _ if string_like => Ok(Value::Str(strip_quotes(tok.raw(), true)?)),
            Tok::Paren(raw) => Ok(Value::List(parse_list(raw)?)),
            _ => err(format!(
                "Expected a quoted string value for dataset attributes. Got value {}",
                tok.raw()
            )),
        },
    }
}

fn parse_comparisons(grammar: Grammar, filter: &str) -> Result<Vec<Comparison>> {
    if filter.trim().is_empty() {
        return Ok(vec![]);
    }
    // Several statements (`a; b`) are refused as a whole, like sqlparse does.
    let statements = filter.split(';').filter(|s| !s.trim().is_empty()).count();
    if statements > 1 && grammar == Grammar::Runs {
        return err(format!(
            "Search filter contained multiple expression {}. Provide AND-ed expression list.",
            super::store::validate::py_repr_str(filter)
        ));
    }
    let toks = tokenize(filter);
    enum Item {
        Cmp(String, String, Tok),
        Null(String, &'static str),
        Tok(Tok),
    }
    let mut items = vec![];
    let mut i = 0;
    while i < toks.len() {
        let at = |k: usize| toks.get(i + k);
        if let Some(Tok::Ident(id)) = at(0) {
            match (at(1), at(2), at(3)) {
                (Some(Tok::Op(op)), Some(v @ (Tok::Str(_) | Tok::Num(..) | Tok::Ident(_) | Tok::Paren(_))), _) => {
                    items.push(Item::Cmp(id.clone(), op.clone(), v.clone()));
                    i += 3;
                    continue;
                }
                (Some(Tok::Kw("IN", kw)), Some(p @ Tok::Paren(_)), _) => {
                    items.push(Item::Cmp(id.clone(), kw.clone(), p.clone()));
                    i += 3;
                    continue;
                }
                (Some(Tok::Kw("IS", _)), Some(Tok::Kw("NULL", _)), _) => {
                    items.push(Item::Null(id.clone(), "IS NULL"));
                    i += 3;
                    continue;
                }
                (Some(Tok::Kw("IS", _)), Some(Tok::Kw("NOT", _)), Some(Tok::Kw("NULL", _))) => {
                    items.push(Item::Null(id.clone(), "IS NOT NULL"));
                    i += 4;
                    continue;
                }
                (Some(Tok::Kw("NOT", _)), Some(Tok::Kw("IN", _)), Some(p @ Tok::Paren(_))) => {
                    items.push(Item::Cmp(id.clone(), "NOT IN".into(), p.clone()));
                    i += 4;
                    continue;
                }
                _ => {}
            }
        }
        items.push(Item::Tok(toks[i].clone()));
        i += 1;
    }
    let invalid: Vec<String> = items
        .iter()
        .filter_map(|it| match it {
            Item::Tok(Tok::Kw("AND", _)) => None,
            Item::Tok(t) => Some(t.raw().to_string()),
            _ => None,
        })
        .collect();
    if !invalid.is_empty() {
        let list: Vec<String> = match grammar {
            Grammar::Runs => invalid.iter().map(|t| format!("'{t}'")).collect(),
            Grammar::Experiments => invalid,
        };
        return err(format!("Invalid clause(s) in filter string: {}", list.join(", ")));
    }
    let valid_attributes = match grammar {
        Grammar::Runs => RUN_SEARCH_ATTRIBUTES,
        Grammar::Experiments => EXPERIMENT_ATTRIBUTES,
    };
    let mut out = vec![];
    for it in items {
        match it {
            Item::Cmp(id, op, v) => {
                let (entity, key) = identifier(grammar, &id, valid_attributes)?;
                let value = value_of(grammar, entity, &key, &v)?;
                out.push(Comparison {
                    entity,
                    key,
                    comparator: op,
                    value,
                });
            }
            Item::Null(id, op) => {
                let (entity, key) = identifier(grammar, &id, valid_attributes)?;
                match grammar {
                    Grammar::Runs if !matches!(entity, Entity::Tag | Entity::Param) => {
                        return err(format!(
                            "IS NULL / IS NOT NULL is only supported for tags and params, not for '{}' '{key}'",
                            entity.mlflow_name()
                        ));
                    }
                    Grammar::Experiments if entity != Entity::Tag => {
                        return err(format!(
                            "IS NULL / IS NOT NULL is only supported for tags, not for attribute '{key}'"
                        ));
                    }
                    _ => {}
                }
                out.push(Comparison {
                    entity,
                    key,
                    comparator: op.into(),
                    value: Value::None,
                });
            }
            Item::Tok(_) => {}
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Typed run filters

/// A numeric comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl NumOp {
    fn parse(op: &str) -> Option<Self> {
        Some(match op {
            "=" => NumOp::Eq,
            "!=" => NumOp::Ne,
            "<" => NumOp::Lt,
            "<=" => NumOp::Le,
            ">" => NumOp::Gt,
            ">=" => NumOp::Ge,
            _ => return None,
        })
    }

    /// The SQL operator.
    pub fn sql(self) -> &'static str {
        match self {
            NumOp::Eq => "=",
            NumOp::Ne => "!=",
            NumOp::Lt => "<",
            NumOp::Le => "<=",
            NumOp::Gt => ">",
            NumOp::Ge => ">=",
        }
    }
}

/// A string comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StrOp {
    Eq(String),
    Ne(String),
    /// Case-sensitive SQL LIKE pattern (`%`, `_`).
    Like(String),
    /// Case-insensitive LIKE.
    ILike(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    IsNull,
    IsNotNull,
}

impl StrOp {
    fn from(comparator: &str, value: Value) -> Option<Self> {
        Some(match (comparator, value) {
            ("=", Value::Str(s)) => StrOp::Eq(s),
            ("!=", Value::Str(s)) => StrOp::Ne(s),
            ("LIKE", Value::Str(s)) => StrOp::Like(s),
            ("ILIKE", Value::Str(s)) => StrOp::ILike(s),
            ("IN", Value::List(l)) => StrOp::In(l),
            ("NOT IN", Value::List(l)) => StrOp::NotIn(l),
            ("IN", Value::Str(s)) => StrOp::In(vec![s]),
            ("NOT IN", Value::Str(s)) => StrOp::NotIn(vec![s]),
            ("IS NULL", _) => StrOp::IsNull,
            ("IS NOT NULL", _) => StrOp::IsNotNull,
            _ => return None,
        })
    }
}

/// A number to compare a numeric attribute with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Number {
    Int(i64),
    Float(f64),
}

/// A run attribute compared as a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStrAttr {
    RunId,
    RunName,
    Status,
    ArtifactUri,
    UserId,
}

/// A run attribute compared as a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunNumAttr {
    StartTime,
    EndTime,
}

/// A dataset field a run filter can compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetField {
    Name,
    Digest,
    Context,
}

/// One validated `runs/search` filter clause.
#[derive(Clone, Debug, PartialEq)]
pub enum RunFilter {
    Metric { key: String, op: NumOp, value: f64 },
    Param { key: String, op: StrOp },
    Tag { key: String, op: StrOp },
    StrAttr { attr: RunStrAttr, op: StrOp },
    NumAttr { attr: RunNumAttr, op: NumOp, value: Number },
    Dataset { field: DatasetField, op: StrOp },
}

/// MLflow's `translate_key_alias`.
fn translate_key_alias(key: &str) -> &str {
    match key {
        "created" | "Created" => "start_time",
        "run name" | "Run name" | "Run Name" => "run_name",
        k => k,
    }
}

fn run_str_attr(key: &str) -> Option<RunStrAttr> {
    Some(match key {
        "run_id" => RunStrAttr::RunId,
        "run_name" => RunStrAttr::RunName,
        "status" => RunStrAttr::Status,
        "artifact_uri" => RunStrAttr::ArtifactUri,
        "user_id" => RunStrAttr::UserId,
        _ => return None,
    })
}

/// Parses a `runs/search` filter (empty: no filter).
pub fn parse_run_filter(filter: &str) -> Result<Vec<RunFilter>> {
    let mut out = vec![];
    for c in parse_comparisons(Grammar::Runs, filter)? {
        let comparator = c.comparator.to_uppercase();
        let key = translate_key_alias(&c.key).to_string();
        let bad = |set: &[&str], close: bool| {
            SearchError(format!(
                "Invalid comparator '{comparator}' not one of '{}{}",
                py_set(set),
                if close { "'" } else { "" }
            ))
        };
        let f = match c.entity {
            Entity::Attribute if !RUN_NUMERIC_ATTRIBUTES.contains(&key.as_str()) => {
                if !STRING_ATTRIBUTE_COMPARATORS.contains(&comparator.as_str()) {
                    return Err(bad(STRING_ATTRIBUTE_COMPARATORS, true));
                }
                let attr = run_str_attr(&key).ok_or_else(|| SearchError(format!("Invalid attribute key '{key}'")))?;
                let op = StrOp::from(&comparator, c.value).ok_or_else(|| bad(STRING_ATTRIBUTE_COMPARATORS, true))?;
                RunFilter::StrAttr { attr, op }
            }
            Entity::Attribute => {
                let op = NumOp::parse(&comparator).ok_or_else(|| bad(STRING_ATTRIBUTE_COMPARATORS, false))?;
                let attr = if key == "end_time" {
                    RunNumAttr::EndTime
                } else {
                    RunNumAttr::StartTime
                };
                let value = match c.value {
                    Value::Int(i) => Number::Int(i),
                    Value::Float(f) => Number::Float(f),
                    other => {
                        return err(format!(
                            "Expected numeric value type for numeric attribute: {key}. Found {other:?}"
                        ));
                    }
                };
                RunFilter::NumAttr { attr, op, value }
            }
            Entity::Metric => {
                let op = NumOp::parse(&comparator).ok_or_else(|| bad(METRIC_COMPARATORS, false))?;
                let Value::Number(raw) = c.value else {
                    return err("Expected numeric value type for metric.");
                };
                let value = parse_python_float(&raw)
                    .ok_or_else(|| SearchError(format!("could not convert string to float: '{raw}'")))?;
                RunFilter::Metric { key, op, value }
            }
            Entity::Param => {
                let op = StrOp::from(&comparator, c.value)
                    .filter(|_| PARAM_COMPARATORS.contains(&comparator.as_str()))
                    .ok_or_else(|| bad(PARAM_COMPARATORS, true))?;
                RunFilter::Param { key, op }
            }
            Entity::Tag => {
                let op = StrOp::from(&comparator, c.value)
                    .filter(|_| PARAM_COMPARATORS.contains(&comparator.as_str()))
                    .ok_or_else(|| bad(PARAM_COMPARATORS, false))?;
                RunFilter::Tag { key, op }
            }
            Entity::Dataset => {
                let op = StrOp::from(&comparator, c.value)
                    .filter(|_| STRING_ATTRIBUTE_COMPARATORS.contains(&comparator.as_str()))
                    .ok_or_else(|| bad(STRING_ATTRIBUTE_COMPARATORS, false))?;
                let field = match key.as_str() {
                    "name" => DatasetField::Name,
                    "digest" => DatasetField::Digest,
                    _ => DatasetField::Context,
                };
                RunFilter::Dataset { field, op }
            }
        };
        out.push(f);
    }
    Ok(out)
}

fn parse_python_float(raw: &str) -> Option<f64> {
    raw.parse::<f64>().ok()
}

// ---------------------------------------------------------------------------
// Typed experiment filters

/// An experiment attribute compared as a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExperimentNumAttr {
    CreationTime,
    LastUpdateTime,
}

/// One validated `experiments/search` filter clause.
#[derive(Clone, Debug, PartialEq)]
pub enum ExperimentFilter {
    /// `name` (=, !=, LIKE, ILIKE).
    Name(StrOp),
    /// `experiment_id` (=, !=, IN, NOT IN), as integers.
    Id {
        negate: bool,
        ids: Vec<i64>,
    },
    Time {
        attr: ExperimentNumAttr,
        op: NumOp,
        value: i64,
    },
    Tag {
        key: String,
        op: StrOp,
    },
}

fn parse_experiment_id(id: &str) -> Result<i64> {
    id.trim().parse::<i64>().map_err(|_| {
        SearchError(format!(
            "Invalid experiment ID '{id}'. Experiment ID must be a valid integer."
        ))
    })
}

/// Parses an `experiments/search` filter (empty: no filter).
pub fn parse_experiment_filter(filter: &str) -> Result<Vec<ExperimentFilter>> {
    let mut out = vec![];
    for c in parse_comparisons(Grammar::Experiments, filter)? {
        let comparator = c.comparator.clone();
        let f = match c.entity {
            Entity::Attribute if c.key == "experiment_id" => {
                let negate = match comparator.to_uppercase().as_str() {
                    "=" | "IN" if comparator != "in" => false,
                    "!=" | "NOT IN" => true,
                    _ => return err(format!("Invalid comparator for experiment_id: {comparator}")),
                };
                let ids = match c.value {
                    Value::Str(s) => vec![parse_experiment_id(&s)?],
                    Value::List(l) => l.iter().map(|s| parse_experiment_id(s)).collect::<Result<_>>()?,
                    _ => return err(format!("Invalid comparator for experiment_id: {comparator}")),
                };
                ExperimentFilter::Id { negate, ids }
            }
            Entity::Attribute if EXPERIMENT_NUMERIC_ATTRIBUTES.contains(&c.key.as_str()) => {
                let Some(op) = NumOp::parse(&comparator) else {
                    return err(format!(
                        "Invalid comparator '{comparator}' not one of '{}",
                        py_set(STRING_ATTRIBUTE_COMPARATORS)
                    ));
                };
                let value = match c.value {
                    Value::Int(i) => i,
                    Value::Float(f) => {
                        return err(format!(
                            "Invalid value for numeric attribute '{}': '{}'",
                            c.key,
                            python_float_str(f)
                        ));
                    }
                    _ => return err(format!("Invalid value for numeric attribute '{}'", c.key)),
                };
                let attr = if c.key == "creation_time" {
                    ExperimentNumAttr::CreationTime
                } else {
                    ExperimentNumAttr::LastUpdateTime
                };
                ExperimentFilter::Time { attr, op, value }
            }
            Entity::Attribute => {
                if !STRING_ATTRIBUTE_COMPARATORS.contains(&comparator.as_str()) {
                    return err(format!(
                        "Invalid comparator '{comparator}' not one of '{}'",
                        py_set(STRING_ATTRIBUTE_COMPARATORS)
                    ));
                }
                if !["=", "!=", "LIKE", "ILIKE"].contains(&comparator.as_str()) {
                    return err(format!("Invalid comparator for string attribute: {comparator}"));
                }
                let op = StrOp::from(&comparator, c.value)
                    .ok_or_else(|| SearchError(format!("Invalid comparator for string attribute: {comparator}")))?;
                ExperimentFilter::Name(op)
            }
            Entity::Tag => {
                if !["=", "!=", "LIKE", "ILIKE", "IS NULL", "IS NOT NULL"].contains(&comparator.as_str()) {
                    return err(format!("Invalid comparator for tag: {comparator}"));
                }
                let op = StrOp::from(&comparator, c.value)
                    .ok_or_else(|| SearchError(format!("Invalid comparator for tag: {comparator}")))?;
                ExperimentFilter::Tag { key: c.key, op }
            }
            other => return err(format!("Invalid token type: {}", other.mlflow_name())),
        };
        out.push(f);
    }
    Ok(out)
}

/// Python's `str(float)` for the few places MLflow prints a float.
fn python_float_str(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

// ---------------------------------------------------------------------------
// ORDER BY

/// What a `runs/search` order_by clause sorts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOrderKey {
    Metric(String),
    Param(String),
    Tag(String),
    /// `start_time`, `end_time`, `status`, `run_id`, `run_name`, `artifact_uri`, `user_id`.
    Attribute(String),
}

/// One `runs/search` order_by clause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOrder {
    pub key: RunOrderKey,
    pub ascending: bool,
}

/// Splits `key [ASC|DESC]` like MLflow (sqlparse + shlex).
fn split_order_by(order_by: &str) -> Result<(String, bool)> {
    let unparsable = || SearchError(format!("Invalid order_by clause '{order_by}'. Could not be parsed."));
    let toks = tokenize(order_by);
    let (ident, direction) = match toks.as_slice() {
        [Tok::Ident(id)] => (id.clone(), None),
        [Tok::Ident(id), Tok::Ident(dir)] if !dir.contains('.') => (id.clone(), Some(dir.clone())),
        [Tok::Ident(id), Tok::Kw(_, dir)] => (id.clone(), Some(dir.clone())),
        _ => return Err(unparsable()),
    };
    // shlex: quotes (backticks count as double quotes) are removed.
    let mut shlexed = String::new();
    let mut quote: Option<char> = None;
    for ch in ident.chars() {
        match (quote, ch) {
            (None, '"' | '`' | '\'') => quote = Some(if ch == '`' { '"' } else { ch }),
            (Some(q), c) if c == q || (q == '"' && c == '`') => quote = None,
            (None, c) if c.is_whitespace() => return Err(unparsable()),
            (_, c) => shlexed.push(c),
        }
    }
    if quote.is_some() {
        return Err(unparsable());
    }
    let ascending = match direction.map(|d| d.to_lowercase()) {
        None => true,
        Some(d) if d == "asc" => true,
        Some(d) if d == "desc" => false,
        Some(_) => return err(format!("Invalid ordering key in order_by clause '{order_by}'.")),
    };
    Ok((shlexed, ascending))
}

/// Parses one `runs/search` order_by clause (`metrics.acc DESC`, `params.p`,
/// `attributes.start_time ASC`, ...).
pub fn parse_run_order_by(order_by: &str) -> Result<RunOrder> {
    let (token, ascending) = split_order_by(order_by)?;
    let (entity, key) = identifier(Grammar::Runs, token.trim(), RUN_ORDER_ATTRIBUTES)?;
    let key = match entity {
        Entity::Metric => RunOrderKey::Metric(key),
        Entity::Param => RunOrderKey::Param(key),
        Entity::Tag => RunOrderKey::Tag(key),
        Entity::Attribute => RunOrderKey::Attribute(translate_key_alias(&key).to_string()),
        Entity::Dataset => return err("Invalid identifier type 'dataset'"),
    };
    Ok(RunOrder { key, ascending })
}

/// Parses a `runs/search` order_by list. MLflow refuses a list naming a key
/// twice with an unclassified (INTERNAL_ERROR) exception: that case is
/// [`OrderByError::Duplicate`].
pub fn parse_run_order_by_list(order_by: &[String]) -> std::result::Result<Vec<RunOrder>, OrderByError> {
    let mut out: Vec<RunOrder> = vec![];
    for o in order_by {
        let parsed = parse_run_order_by(o).map_err(OrderByError::Invalid)?;
        if out.iter().any(|p| p.key == parsed.key) {
            let list: Vec<String> = order_by.iter().map(|s| format!("'{s}'")).collect();
            return Err(OrderByError::Duplicate(format!(
                "`order_by` contains duplicate fields: [{}]",
                list.join(", ")
            )));
        }
        out.push(parsed);
    }
    Ok(out)
}

/// Why a `runs/search` order_by list is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderByError {
    /// INVALID_PARAMETER_VALUE.
    Invalid(SearchError),
    /// MLflow answers INTERNAL_ERROR (500) with this message.
    Duplicate(String),
}

/// What an `experiments/search` order_by clause sorts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExperimentOrderKey {
    Name,
    ExperimentId,
    CreationTime,
    LastUpdateTime,
}

/// Parses an `experiments/search` order_by list; empty means MLflow's
/// default (`creation_time DESC, experiment_id ASC`). An `experiment_id DESC`
/// tie-breaker is added when the list does not order by id.
pub fn parse_experiment_order_by(order_by: &[String]) -> Result<Vec<(ExperimentOrderKey, bool)>> {
    let default = ["creation_time DESC".to_string(), "experiment_id ASC".to_string()];
    let list = if order_by.is_empty() { &default[..] } else { order_by };
    let mut out = vec![];
    for o in list {
        let (token, ascending) = split_order_by(o)?;
        let (entity, key) = identifier(Grammar::Experiments, token.trim(), EXPERIMENT_ATTRIBUTES)?;
        if entity != Entity::Attribute {
            return err(format!("Invalid order_by entity: {}", entity.mlflow_name()));
        }
        let key = match key.as_str() {
            "name" => ExperimentOrderKey::Name,
            "experiment_id" => ExperimentOrderKey::ExperimentId,
            "creation_time" => ExperimentOrderKey::CreationTime,
            _ => ExperimentOrderKey::LastUpdateTime,
        };
        out.push((key, ascending));
    }
    if !out.iter().any(|(k, _)| *k == ExperimentOrderKey::ExperimentId) {
        out.push((ExperimentOrderKey::ExperimentId, false));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Page tokens

/// MLflow's page token: base64 of the JSON `{"offset": N}`.
pub fn create_page_token(offset: u64) -> String {
    B64.encode(format!("{{\"offset\": {offset}}}"))
}

/// Python's `repr(bytes)`, for MLflow's page token messages.
fn py_bytes_repr(b: &[u8]) -> String {
    let mut s = String::from("b'");
    for &c in b {
        match c {
            b'\\' => s.push_str("\\\\"),
            b'\'' => s.push_str("\\'"),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7e => s.push(c as char),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s.push('\'');
    s
}

/// Python's `repr` of a JSON value (dict/list/str/number), roughly.
fn py_repr(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "None".into(),
        serde_json::Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => format!("'{s}'"),
        serde_json::Value::Array(a) => format!("[{}]", a.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        serde_json::Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("'{k}': {}", py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The offset a page token encodes (0 without a token).
pub fn parse_page_token(token: Option<&str>) -> Result<u64> {
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Ok(0);
    };
    // Python's b64decode ignores characters outside the alphabet.
    let cleaned: String = token
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '+' || *c == '/' || *c == '=')
        .collect();
    let decoded = B64
        .decode(cleaned.as_bytes())
        .map_err(|_| SearchError("Invalid page token, could not base64-decode".into()))?;
    let parsed: serde_json::Value = serde_json::from_slice(&decoded)
        .map_err(|_| SearchError(format!("Invalid page token, decoded value={}", py_bytes_repr(&decoded))))?;
    let offset = parsed.get("offset").cloned().unwrap_or(serde_json::Value::Null);
    let falsy = match &offset {
        serde_json::Value::Null => true,
        serde_json::Value::Bool(b) => !b,
        serde_json::Value::Number(n) => n.as_f64() == Some(0.0),
        serde_json::Value::String(s) => s.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Object(o) => o.is_empty(),
    };
    if falsy {
        return err(format!("Invalid page token, parsed value={}", py_repr(&parsed)));
    }
    let n = match &offset {
        serde_json::Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f.trunc() as i64)),
        serde_json::Value::String(s) => s.trim().parse::<i64>().ok(),
        serde_json::Value::Bool(true) => Some(1),
        _ => None,
    };
    match n {
        Some(n) if n >= 0 => Ok(n as u64),
        Some(_) => Ok(0),
        None => err(format!("Invalid page token, not stringable {}", py_repr(&offset))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(f: &str) -> Vec<RunFilter> {
        parse_run_filter(f).unwrap_or_else(|e| panic!("{f}: {e}"))
    }

    fn run_err(f: &str) -> String {
        parse_run_filter(f).expect_err(f).0
    }

    #[test]
    fn parses_the_filters_users_write() {
        assert_eq!(
            run("metrics.acc > 0.9 and params.lr = '0.01' and tags.t != 'a' and attributes.status = 'FINISHED'"),
            vec![
                RunFilter::Metric {
                    key: "acc".into(),
                    op: NumOp::Gt,
                    value: 0.9
                },
                RunFilter::Param {
                    key: "lr".into(),
                    op: StrOp::Eq("0.01".into())
                },
                RunFilter::Tag {
                    key: "t".into(),
                    op: StrOp::Ne("a".into())
                },
                RunFilter::StrAttr {
                    attr: RunStrAttr::Status,
                    op: StrOp::Eq("FINISHED".into())
                },
            ]
        );
        assert_eq!(
            run("metric.`my key` <= -1.5e3"),
            vec![RunFilter::Metric {
                key: "my key".into(),
                op: NumOp::Le,
                value: -1500.0
            }]
        );
        assert_eq!(
            run(r#"metrics."my key">=.5"#),
            vec![RunFilter::Metric {
                key: "my key".into(),
                op: NumOp::Ge,
                value: 0.5
            }]
        );
        assert_eq!(
            run(r#"param.lr LIKE "%1" AND parameters.x ilike 'A%'"#),
            vec![
                RunFilter::Param {
                    key: "lr".into(),
                    op: StrOp::Like("%1".into())
                },
                RunFilter::Param {
                    key: "x".into(),
                    op: StrOp::ILike("A%".into())
                },
            ]
        );
        assert_eq!(
            run("tags.mlflow.runName = 'x' and tag.`a b` IS NOT NULL and params.p is null"),
            vec![
                RunFilter::Tag {
                    key: "mlflow.runName".into(),
                    op: StrOp::Eq("x".into())
                },
                RunFilter::Tag {
                    key: "a b".into(),
                    op: StrOp::IsNotNull
                },
                RunFilter::Param {
                    key: "p".into(),
                    op: StrOp::IsNull
                },
            ]
        );
    }

    #[test]
    fn parses_attributes_and_their_aliases() {
        assert_eq!(
            run("attr.start_time > 5 and attribute.end_time <= 5.5 and created >= 1"),
            vec![
                RunFilter::NumAttr {
                    attr: RunNumAttr::StartTime,
                    op: NumOp::Gt,
                    value: Number::Int(5)
                },
                RunFilter::NumAttr {
                    attr: RunNumAttr::EndTime,
                    op: NumOp::Le,
                    value: Number::Float(5.5)
                },
                RunFilter::NumAttr {
                    attr: RunNumAttr::StartTime,
                    op: NumOp::Ge,
                    value: Number::Int(1)
                },
            ]
        );
        assert_eq!(
            run("run.status != 'RUNNING' and `run name` = 'x' and attributes.run_id IN ('a', \"b\")"),
            vec![
                RunFilter::StrAttr {
                    attr: RunStrAttr::Status,
                    op: StrOp::Ne("RUNNING".into())
                },
                RunFilter::StrAttr {
                    attr: RunStrAttr::RunName,
                    op: StrOp::Eq("x".into())
                },
                RunFilter::StrAttr {
                    attr: RunStrAttr::RunId,
                    op: StrOp::In(vec!["a".into(), "b".into()])
                },
            ]
        );
        assert_eq!(
            run("attributes.run_id NOT IN ('a') and attributes.user_id = 'bob'"),
            vec![
                RunFilter::StrAttr {
                    attr: RunStrAttr::RunId,
                    op: StrOp::NotIn(vec!["a".into()])
                },
                RunFilter::StrAttr {
                    attr: RunStrAttr::UserId,
                    op: StrOp::Eq("bob".into())
                },
            ]
        );
        // AND is optional between comparisons, and may dangle, as in MLflow.
        assert_eq!(run("and metrics.m > 1 metrics.n < 2 AND").len(), 2);
        assert_eq!(run("").len(), 0);
        assert_eq!(run("   ").len(), 0);
    }

    #[test]
    fn answers_mlflows_messages_for_malformed_filters() {
        assert_eq!(
            run_err("metrics.m > 1 OR metrics.n < 2"),
            "Invalid clause(s) in filter string: 'OR'"
        );
        assert_eq!(
            run_err("metrics.m >"),
            "Invalid clause(s) in filter string: 'metrics.m', '>'"
        );
        assert_eq!(
            run_err("metrics.m > 1 and not params.p = 'x'"),
            "Invalid clause(s) in filter string: 'not'"
        );
        assert_eq!(
            run_err("(metrics.m > 1)"),
            "Invalid clause(s) in filter string: '(metrics.m > 1)'"
        );
        assert_eq!(
            run_err("metrics.m = 'x'"),
            "Expected numeric value type for metric. Found 'x'"
        );
        assert_eq!(
            run_err("params.p = 1"),
            "Expected a quoted string value for parameter (e.g. 'my-value'). Got value 1"
        );
        assert_eq!(
            run_err("params.p IN ('a')"),
            "Expected a quoted string value for parameter (e.g. 'my-value'). Got value ('a')"
        );
        assert_eq!(
            run_err("attributes.start_time = 'x'"),
            "Expected numeric value type for numeric attribute: start_time. Found 'x'"
        );
        assert_eq!(
            run_err("attributes.status = 1"),
            "Expected a quoted string value for attributes. Got value 1"
        );
        assert_eq!(
            run_err("foo.bar = 1"),
            "Invalid entity type 'foo'. Valid values are ['metric', 'parameter', 'tag', 'attribute', 'dataset']"
        );
        assert!(
            run_err("attributes.foo = 'x'").starts_with("Invalid attribute key 'foo' specified. Valid keys are '{")
        );
        assert_eq!(
            run_err("metrics.m > 1; metrics.n > 2"),
            "Search filter contained multiple expression 'metrics.m > 1; metrics.n > 2'. Provide AND-ed expression list."
        );
        assert_eq!(
            run_err("metrics.m IS NULL"),
            "IS NULL / IS NOT NULL is only supported for tags and params, not for 'metric' 'm'"
        );
        assert_eq!(
            run_err("attributes.status IN ('a', 'b')"),
            "Only ['run_id'] attributes support comparison with a list of quoted string values."
        );
        assert_eq!(
            run_err("attributes.run_id IN ()"),
            "While parsing a list in the query, expected a non-empty list of string values, but got empty list"
        );
        assert_eq!(
            run_err("params.p = abc"),
            "Parameter value is either not quoted or unidentified quote types used for string value abc. \
             Use either single or double quotes."
        );
        assert!(run_err("metrics.m == 1").starts_with("Invalid comparator '==' not one of '{"));
        assert!(run_err("metrics.m like 1").starts_with("Invalid comparator 'LIKE' not one of '{"));
        assert!(run_err("params.p > 'a'").starts_with("Invalid comparator '>' not one of '{"));
        assert!(run_err("params.p > 'a'").ends_with("}'"));
        assert!(run_err("attributes.start_time LIKE 1").starts_with("Invalid comparator 'LIKE' not one of '{"));
        assert!(run_err("METRICS.m > 1").starts_with("Invalid entity type 'METRICS'"));
    }

    #[test]
    fn parses_experiment_filters() {
        assert_eq!(
            parse_experiment_filter("name LIKE 'x%' and tags.k = 'v' and tag.j IS NULL").unwrap(),
            vec![
                ExperimentFilter::Name(StrOp::Like("x%".into())),
                ExperimentFilter::Tag {
                    key: "k".into(),
                    op: StrOp::Eq("v".into())
                },
                ExperimentFilter::Tag {
                    key: "j".into(),
                    op: StrOp::IsNull
                },
            ]
        );
        assert_eq!(
            parse_experiment_filter("creation_time > 5 and experiment_id IN ('1','2') and attribute.name != 'a'")
                .unwrap(),
            vec![
                ExperimentFilter::Time {
                    attr: ExperimentNumAttr::CreationTime,
                    op: NumOp::Gt,
                    value: 5
                },
                ExperimentFilter::Id {
                    negate: false,
                    ids: vec![1, 2]
                },
                ExperimentFilter::Name(StrOp::Ne("a".into())),
            ]
        );
        let e = |f: &str| parse_experiment_filter(f).expect_err(f).0;
        assert_eq!(
            e("attributes.name = 'x'"),
            "Invalid entity type 'attributes'. Valid entity types are ('attribute', 'tag', 'tags')"
        );
        assert_eq!(
            e("name IN ('a')"),
            "Only ['experiment_id'] attributes support comparison with a list of quoted string values."
        );
        assert_eq!(
            e("name IS NULL"),
            "IS NULL / IS NOT NULL is only supported for tags, not for attribute 'name'"
        );
        assert_eq!(
            e("name > 'a'"),
            "Invalid comparator '>' not one of '{'!=', '=', 'LIKE', 'ILIKE', 'IN', 'NOT IN'}'"
        );
        assert_eq!(e("tags.k > 'a'"), "Invalid comparator for tag: >");
        assert_eq!(e("experiment_id in ('1')"), "Invalid comparator for experiment_id: in");
        assert_eq!(
            e("experiment_id = 'x'"),
            "Invalid experiment ID 'x'. Experiment ID must be a valid integer."
        );
        assert_eq!(
            e("creation_time > 1.5"),
            "Invalid value for numeric attribute 'creation_time': '1.5'"
        );
    }

    #[test]
    fn parses_order_by_like_mlflow() {
        let o = |s: &str| parse_run_order_by(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(
            o("metrics.m DESC"),
            RunOrder {
                key: RunOrderKey::Metric("m".into()),
                ascending: false
            }
        );
        assert!(!o("metrics.m  desc").ascending);
        assert_eq!(o("params.p").key, RunOrderKey::Param("p".into()));
        assert_eq!(o("tags.t ASC").key, RunOrderKey::Tag("t".into()));
        assert_eq!(
            o("attributes.start_time DESC").key,
            RunOrderKey::Attribute("start_time".into())
        );
        assert_eq!(o("created").key, RunOrderKey::Attribute("start_time".into()));
        assert_eq!(o("metrics.`my key` DESC").key, RunOrderKey::Metric("my key".into()));
        assert_eq!(o("metrics.\"my key\"").key, RunOrderKey::Metric("my key".into()));
        assert_eq!(o("`metrics`.m").key, RunOrderKey::Metric("m".into()));
        assert_eq!(o("metric.a.b DESC").key, RunOrderKey::Metric("a.b".into()));
        let e = |s: &str| parse_run_order_by(s).expect_err(s).0;
        assert_eq!(
            e("metrics.m foo"),
            "Invalid ordering key in order_by clause 'metrics.m foo'."
        );
        assert_eq!(
            e("metrics.m DESC x"),
            "Invalid order_by clause 'metrics.m DESC x'. Could not be parsed."
        );
        assert_eq!(e(""), "Invalid order_by clause ''. Could not be parsed.");
        assert_eq!(
            e("metrics.m, params.p"),
            "Invalid order_by clause 'metrics.m, params.p'. Could not be parsed."
        );
        assert!(e("timestamp").starts_with("Invalid attribute key 'timestamp' specified."));
        assert_eq!(
            parse_run_order_by_list(&["metrics.m".into(), "metrics.m DESC".into()]).unwrap_err(),
            OrderByError::Duplicate("`order_by` contains duplicate fields: ['metrics.m', 'metrics.m DESC']".into())
        );
    }

    #[test]
    fn parses_experiment_order_by_with_defaults() {
        assert_eq!(
            parse_experiment_order_by(&[]).unwrap(),
            vec![
                (ExperimentOrderKey::CreationTime, false),
                (ExperimentOrderKey::ExperimentId, true)
            ]
        );
        assert_eq!(
            parse_experiment_order_by(&["name".into()]).unwrap(),
            vec![
                (ExperimentOrderKey::Name, true),
                (ExperimentOrderKey::ExperimentId, false)
            ]
        );
        assert_eq!(
            parse_experiment_order_by(&["tags.x".into()]).unwrap_err().0,
            "Invalid order_by entity: tag"
        );
    }

    #[test]
    fn page_tokens_are_mlflows() {
        assert_eq!(create_page_token(1), "eyJvZmZzZXQiOiAxfQ==");
        assert_eq!(parse_page_token(Some("eyJvZmZzZXQiOiAxfQ==")).unwrap(), 1);
        assert_eq!(parse_page_token(Some(&create_page_token(12345))).unwrap(), 12345);
        assert_eq!(parse_page_token(None).unwrap(), 0);
        assert_eq!(parse_page_token(Some("")).unwrap(), 0);
        assert_eq!(
            parse_page_token(Some("abc")).unwrap_err().0,
            "Invalid page token, could not base64-decode"
        );
        assert_eq!(
            parse_page_token(Some(&B64.encode("nope"))).unwrap_err().0,
            "Invalid page token, decoded value=b'nope'"
        );
        assert_eq!(
            parse_page_token(Some(&B64.encode("{\"offset\": 0}"))).unwrap_err().0,
            "Invalid page token, parsed value={'offset': 0}"
        );
    }
}
