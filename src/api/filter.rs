//! Consul's `?filter=` expression language (go-bexpr v0.1.2, the version Consul
//! vendors), evaluated against the JSON of one API item. An expression combines
//! matches such as `Service.Tags contains "primary"`, `"qa" in NodeMeta.env`,
//! `Checks.Status != passing` or `Name matches "^web-"` with `and`, `or`, `not`
//! and parentheses (`not` binds tighter than `and`, which binds tighter than
//! `or`). bexpr validates selectors against Go struct types; we only have JSON,
//! so we follow the observable behaviour instead: a missing *top-level* key is an
//! error (`Selector "X" is not valid`), a missing nested key behaves like a
//! missing map key (`==` false, `!=` true, `is empty` true, ...), and JSON `null`
//! behaves the same way. Selecting through an array of objects (`Checks.Status`)
//! matches when *any* element matches, as bexpr does for slices of structs.

use std::fmt::Write as _;

use regex::Regex;
use serde_json::{Number, Value};

/// Maximum nesting of parentheses and `not`, so hostile input cannot overflow the stack.
const MAX_DEPTH: usize = 64;

/// Why an expression could not be parsed or evaluated.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// Invalid syntax (or an invalid regular expression); `column` is 1-based, in characters.
    #[error("filter parse error at column {column}: {message}")]
    Parse { column: usize, message: String },
    /// The selector names no field of the item, or descends into a scalar.
    #[error("Selector \"{selector}\" is not valid")]
    InvalidSelector { selector: String },
    /// The operator cannot be applied to the selected value (e.g. `==` on an array).
    #[error("Invalid match operator \"{operator}\" for selector \"{selector}\" holding {kind}")]
    InvalidOperator { operator: &'static str, selector: String, kind: &'static str },
    /// The literal cannot be converted to the selected field's type (e.g. `Port == abc`).
    #[error("Failed to coerce value \"{value}\" for selector \"{selector}\" to {kind}")]
    Coerce { value: String, selector: String, kind: &'static str },
}

/// A parsed filter expression.
#[derive(Debug, Clone)]
pub struct Filter {
    expr: Expr,
}

#[derive(Debug, Clone)]
enum Expr {
    // n-ary so that long `a or b or c ...` chains do not build deep trees
    Or(Vec<Expr>),
    And(Vec<Expr>),
    Not(Box<Expr>),
    Match(Match),
}

#[derive(Debug, Clone)]
struct Match {
    selector: Vec<String>,
    op: Op,
    /// The literal as written (bare words keep their dotted text); empty for `is empty`.
    value: String,
    /// Compiled once at parse time for `matches` / `not matches`, as bexpr validates it up front.
    regex: Option<Regex>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    In, // also `contains`
    NotIn,
    IsEmpty,
    IsNotEmpty,
    Matches,
    NotMatches,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::In => "in",
            Op::NotIn => "not in",
            Op::IsEmpty => "is empty",
            Op::IsNotEmpty => "is not empty",
            Op::Matches => "matches",
            Op::NotMatches => "not matches",
        }
    }

    /// The negative operators are evaluated as the positive one, then inverted.
    fn split(self) -> (Op, bool) {
        match self {
            Op::Ne => (Op::Eq, true),
            Op::NotIn => (Op::In, true),
            Op::IsNotEmpty => (Op::IsEmpty, true),
            Op::NotMatches => (Op::Matches, true),
            op => (op, false),
        }
    }
}

impl Filter {
    /// Parses `expr`; regular expressions are compiled here, so a bad one is a parse error.
    pub fn parse(expr: &str) -> Result<Filter, FilterError> {
        let mut p = Parser { src: expr, pos: 0, depth: 0 };
        p.skip_ws();
        if p.peek().is_none() {
            return p.error(p.pos, "empty filter expression");
        }
        let expr = p.or()?;
        p.skip_ws();
        if p.peek().is_some() {
            return p.expected("\"and\", \"or\" or end of input");
        }
        Ok(Filter { expr })
    }

    /// Evaluate against one JSON object (the exact JSON the API returns for one item).
    pub fn matches(&self, item: &Value) -> Result<bool, FilterError> {
        eval(&self.expr, item)
    }
}

/// Convenience: keep the items of `items` that match; error if the expression is invalid.
/// An empty expression keeps everything, as Consul ignores an empty `?filter=`.
pub fn apply(expr: &str, items: Vec<Value>) -> Result<Vec<Value>, FilterError> {
    if expr.is_empty() {
        return Ok(items);
    }
    let filter = Filter::parse(expr)?;
    let mut kept = Vec::with_capacity(items.len());
    for item in items {
        if filter.matches(&item)? {
            kept.push(item);
        }
    }
    Ok(kept)
}

fn eval(expr: &Expr, item: &Value) -> Result<bool, FilterError> {
    match expr {
        Expr::Or(terms) => any(terms, |t| eval(t, item)),
        Expr::And(terms) => any(terms, |t| eval(t, item).map(|b| !b)).map(|b| !b),
        Expr::Not(inner) => eval(inner, item).map(|b| !b),
        Expr::Match(m) => m.select(item, 0),
    }
}

/// Short-circuiting "any": stops at the first `true` or error.
fn any<'a, T>(items: &'a [T], mut f: impl FnMut(&'a T) -> Result<bool, FilterError>) -> Result<bool, FilterError> {
    let first = items.iter().map(&mut f).find(|r| !matches!(r, Ok(false)));
    first.unwrap_or(Ok(false))
}

impl Match {
    /// Walks the selector from segment `depth` into `value`.
    fn select(&self, value: &Value, depth: usize) -> Result<bool, FilterError> {
        let Some(segment) = self.selector.get(depth) else {
            return self.test(value);
        };
        match value {
            Value::Object(map) => match map.get(segment) {
                Some(child) => self.select(child, depth + 1),
                // bexpr rejects unknown struct fields; every API item is a struct.
                None if depth == 0 => Err(self.invalid_selector(1)),
                // Deeper objects may be maps (Meta, NodeMeta, ...): a missing key is absent.
                None => Ok(self.absent()),
            },
            // bexpr: selecting into a slice of structs is an implicit "any element".
            Value::Array(items) => any(items, |item| self.select(item, depth)),
            Value::Null => Ok(self.absent()),
            _ => Err(self.invalid_selector(depth + 1)),
        }
    }

    /// bexpr's "NotPresentDisposition": nothing equals, contains or matches a
    /// missing value, and a missing value is empty.
    fn absent(&self) -> bool {
        let (op, negated) = self.op.split();
        (op == Op::IsEmpty) != negated
    }

    fn test(&self, value: &Value) -> Result<bool, FilterError> {
        let (op, negated) = self.op.split();
        let hit = match (op, value) {
            (_, Value::Null) => return Ok(self.absent()),
            (Op::Eq, v) => self.equals(v)?,
            (Op::In, Value::String(s)) => s.contains(self.value.as_str()),
            (Op::In, Value::Object(map)) => map.contains_key(&self.value),
            (Op::In, Value::Array(items)) if !items.iter().any(|v| v.is_object() || v.is_array()) => any(items, |item| self.equals(item))?,
            (Op::IsEmpty, Value::String(s)) => s.is_empty(),
            (Op::IsEmpty, Value::Array(items)) => items.is_empty(),
            (Op::IsEmpty, Value::Object(map)) => map.is_empty(),
            (Op::Matches, Value::String(s)) => self.regex.as_ref().is_some_and(|re| re.is_match(s)),
            _ => return Err(self.invalid_operator(kind(value))),
        };
        Ok(hit != negated)
    }

    /// `==` semantics, also used for array elements by `in`: the literal is
    /// coerced to the JSON value's type like bexpr coerces to the Go field type.
    fn equals(&self, value: &Value) -> Result<bool, FilterError> {
        match value {
            Value::Null => Ok(false),
            Value::String(s) => Ok(*s == self.value),
            Value::Bool(b) => parse_go_bool(&self.value).map(|lit| lit == *b).ok_or_else(|| self.coerce_error("a boolean")),
            Value::Number(n) => number_equals(n, &self.value).ok_or_else(|| self.coerce_error("a number")),
            _ => Err(self.invalid_operator(kind(value))),
        }
    }

    fn invalid_selector(&self, len: usize) -> FilterError {
        let prefix = self.selector.get(..len).unwrap_or(&self.selector);
        FilterError::InvalidSelector { selector: display_path(prefix) }
    }

    fn invalid_operator(&self, kind: &'static str) -> FilterError {
        FilterError::InvalidOperator { operator: self.op.name(), selector: display_path(&self.selector), kind }
    }

    fn coerce_error(&self, kind: &'static str) -> FilterError {
        FilterError::Coerce { value: self.value.clone(), selector: display_path(&self.selector), kind }
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(a) if a.iter().any(|v| v.is_object() || v.is_array()) => "an array of objects",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn display_path(path: &[String]) -> String {
    let mut out = String::new();
    for (i, seg) in path.iter().enumerate() {
        let plain = seg.bytes().next().is_some_and(is_ident_start) && seg.bytes().all(is_ident_char);
        match (i, plain) {
            (0, _) => out.push_str(seg),
            (_, true) => {
                out.push('.');
                out.push_str(seg);
            }
            (_, false) => {
                let _ = write!(out, "[{seg:?}]");
            }
        }
    }
    out
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(raw: &str) -> Option<bool> {
    match raw {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `strconv.ParseInt(raw, 0, _)`: optional sign, `0x`/`0o`/`0b` prefixes,
/// and a leading `0` meaning octal.
fn parse_go_int(raw: &str) -> Option<i128> {
    let (negative, s) = match raw.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, raw.strip_prefix('+').unwrap_or(raw)),
    };
    let (radix, digits) = match s.get(..2) {
        Some("0x" | "0X") => (16, &s[2..]),
        Some("0o" | "0O") => (8, &s[2..]),
        Some("0b" | "0B") => (2, &s[2..]),
        _ if s.len() > 1 && s.starts_with('0') => (8, &s[1..]),
        _ => (10, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let magnitude = i128::from_str_radix(digits, radix).ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

/// `None` when the literal is not a number at all. Deliberately lenient: JSON
/// cannot tell a Go float field holding `1` from an int field, so an integer
/// field compared with `1.5` is simply unequal where bexpr would reject it.
fn number_equals(n: &Number, raw: &str) -> Option<bool> {
    let int = n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from));
    match (int, parse_go_int(raw)) {
        (Some(value), Some(literal)) => Some(value == literal),
        (_, literal) => {
            let literal = literal.map(|i| i as f64).or_else(|| raw.parse::<f64>().ok())?;
            Some(n.as_f64()? == literal)
        }
    }
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic()
}

fn is_ident_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Recursive-descent parser following bexpr's PEG grammar. Deliberate leniency:
/// keywords need a word boundary rather than surrounding whitespace, so
/// `not(A == b)` and `(A == b)or(C == d)` are accepted.
struct Parser<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.src.as_bytes().get(self.pos).copied()
    }

    fn rest(&self) -> &'a str {
        self.src.get(self.pos..).unwrap_or("")
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        let hit = self.rest().starts_with(token);
        if hit {
            self.pos += token.len();
        }
        hit
    }

    /// Consumes `kw` only as a whole word (keywords are case-sensitive, as in bexpr).
    fn keyword(&mut self, kw: &str) -> bool {
        let rest = self.rest();
        let hit = rest.starts_with(kw) && !rest.as_bytes().get(kw.len()).is_some_and(|&b| is_ident_char(b));
        if hit {
            self.pos += kw.len();
        }
        hit
    }

    fn error<T>(&self, pos: usize, message: impl Into<String>) -> Result<T, FilterError> {
        let column = self.src.get(..pos).map_or(pos, |s| s.chars().count()) + 1;
        let message = message.into();
        Err(FilterError::Parse { column, message })
    }

    /// Fails at the cursor with "expected ..., found <what is there>".
    fn expected<T>(&self, what: &str) -> Result<T, FilterError> {
        let token: String = self.rest().chars().take_while(|c| !" \t\r\n".contains(*c)).take(20).collect();
        let found = if token.is_empty() { "end of input".into() } else { format!("{token:?}") };
        self.error(self.pos, format!("expected {what}, found {found}"))
    }

    fn enter(&mut self) -> Result<(), FilterError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.error(self.pos, format!("expression nested more than {MAX_DEPTH} deep"));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Expr, FilterError> {
        self.chain("or", Self::and, Expr::Or)
    }

    fn and(&mut self) -> Result<Expr, FilterError> {
        self.chain("and", Self::unary, Expr::And)
    }

    fn chain(&mut self, kw: &str, next: fn(&mut Self) -> Result<Expr, FilterError>, wrap: fn(Vec<Expr>) -> Expr) -> Result<Expr, FilterError> {
        let mut terms = vec![next(self)?];
        loop {
            let save = self.pos;
            self.skip_ws();
            if !self.keyword(kw) {
                self.pos = save;
                break;
            }
            self.skip_ws();
            terms.push(next(self)?);
        }
        Ok(if terms.len() == 1 { terms.remove(0) } else { wrap(terms) })
    }

    fn unary(&mut self) -> Result<Expr, FilterError> {
        if !self.keyword("not") {
            return self.primary();
        }
        self.enter()?;
        self.skip_ws();
        let inner = self.unary()?;
        self.depth -= 1;
        Ok(Expr::Not(Box::new(inner)))
    }

    fn primary(&mut self) -> Result<Expr, FilterError> {
        if self.peek() != Some(b'(') {
            return self.matcher().map(Expr::Match);
        }
        self.pos += 1;
        self.enter()?;
        self.skip_ws();
        let inner = self.or()?;
        self.skip_ws();
        if !self.eat(")") {
            return self.expected("\")\" (unmatched parentheses)");
        }
        self.depth -= 1;
        Ok(inner)
    }

    /// `<selector> <op> [value]`, or `<value> [not] in <selector>`.
    fn matcher(&mut self) -> Result<Match, FilterError> {
        let value = match self.peek() {
            Some(b) if is_ident_start(b) => {
                let selector = self.selector()?;
                self.skip_ws();
                if let Some(m) = self.selector_op(selector.clone())? {
                    return Ok(m);
                }
                selector.join(".") // bexpr uses a bare word's dotted text as the value
            }
            Some(b'"' | b'`') => self.string()?,
            Some(b'-' | b'0'..=b'9') => self.number()?,
            _ => return self.expected("a selector, a value or \"(\""),
        };
        self.skip_ws();
        let negated = self.keyword("not");
        self.skip_ws();
        if !self.keyword("in") {
            let ops = "an operator (==, !=, [not] contains, [not] in, [not] matches, is [not] empty)";
            return self.expected(if negated { "\"in\", \"contains\" or \"matches\"" } else { ops });
        }
        self.skip_ws();
        if !self.peek().is_some_and(is_ident_start) {
            return self.expected("a selector after \"in\" (invalid selector)");
        }
        let selector = self.selector()?;
        let op = if negated { Op::NotIn } else { Op::In };
        Ok(Match { selector, op, value, regex: None })
    }

    /// Parses the operator and value after a selector; `None` (nothing consumed)
    /// when what follows is `in` / `not in`, making the selector a bare-word value.
    fn selector_op(&mut self, selector: Vec<String>) -> Result<Option<Match>, FilterError> {
        let save = self.pos;
        let negated = self.keyword("not");
        self.skip_ws();
        let op = match () {
            _ if !negated && self.eat("==") => Op::Eq,
            _ if !negated && self.eat("!=") => Op::Ne,
            _ if self.keyword("contains") => [Op::In, Op::NotIn][negated as usize],
            _ if self.keyword("matches") => [Op::Matches, Op::NotMatches][negated as usize],
            _ if !negated && self.keyword("is") => {
                self.skip_ws();
                let op = if self.keyword("not") { Op::IsNotEmpty } else { Op::IsEmpty };
                self.skip_ws();
                if !self.keyword("empty") {
                    return self.expected("\"empty\"");
                }
                return Ok(Some(Match { selector, op, value: String::new(), regex: None }));
            }
            _ => {
                self.pos = save;
                return Ok(None);
            }
        };
        self.skip_ws();
        let value_pos = self.pos;
        let value = match self.peek() {
            Some(b'"' | b'`') => self.string()?,
            Some(b'-' | b'0'..=b'9') => self.number()?,
            Some(b) if is_ident_start(b) => self.selector()?.join("."),
            _ => return self.expected(&format!("a value after \"{}\"", op.name())),
        };
        let regex = match op {
            Op::Matches | Op::NotMatches => match Regex::new(&value) {
                Ok(re) => Some(re),
                Err(e) => {
                    // regex errors are multi-line (pattern, caret, reason): keep the reason
                    let e = e.to_string();
                    let reason = e.lines().last().unwrap_or_default().trim_start_matches("error: ");
                    return self.error(value_pos, format!("invalid regex {value:?}: {reason}"));
                }
            },
            _ => None,
        };
        Ok(Some(Match { selector, op, value, regex }))
    }

    /// `Ident ("." Ident | "[" string "]")*` where `Ident` is `[a-zA-Z][a-zA-Z0-9_]*`.
    fn selector(&mut self) -> Result<Vec<String>, FilterError> {
        let mut path = vec![self.ident()];
        loop {
            if self.eat(".") {
                if !self.peek().is_some_and(is_ident_start) {
                    return self.expected("a field name after \".\"");
                }
                path.push(self.ident());
            } else if self.eat("[") {
                self.skip_ws();
                if !matches!(self.peek(), Some(b'"' | b'`')) {
                    return self.expected("a quoted string after \"[\" (invalid index)");
                }
                path.push(self.string()?);
                self.skip_ws();
                if !self.eat("]") {
                    return self.expected("\"]\" (unclosed index expression)");
                }
            } else {
                return Ok(path);
            }
        }
    }

    fn ident(&mut self) -> String {
        let start = self.pos;
        while self.peek().is_some_and(is_ident_char) {
            self.pos += 1;
        }
        self.src.get(start..self.pos).unwrap_or_default().to_string()
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?`, which must be followed by whitespace, `)` or the end.
    fn number(&mut self) -> Result<String, FilterError> {
        let (start, bytes) = (self.pos, self.src.as_bytes());
        let digits_at = |i: usize| bytes.get(i..).map_or(0, |s| s.iter().take_while(|b| b.is_ascii_digit()).count());
        let mut end = start + usize::from(bytes.get(start) == Some(&b'-'));
        let int_digits = digits_at(end);
        let mut valid = int_digits == 1 || (int_digits > 1 && bytes.get(end) != Some(&b'0'));
        end += int_digits;
        if bytes.get(end) == Some(&b'.') {
            let frac = digits_at(end + 1);
            valid &= frac > 0;
            end += 1 + frac;
        }
        valid &= matches!(bytes.get(end), None | Some(b' ' | b'\t' | b'\r' | b'\n' | b')'));
        if !valid {
            return self.error(start, "Invalid number literal");
        }
        self.pos = end;
        Ok(self.src.get(start..end).unwrap_or_default().to_string())
    }

    /// A `backtick` (raw) or "double-quoted" string, unquoted like Go's `strconv.Unquote`.
    fn string(&mut self) -> Result<String, FilterError> {
        let start = self.pos;
        let quote = if self.peek() == Some(b'`') { '`' } else { '"' };
        let body_start = start + 1;
        let rest = self.src.get(body_start..).unwrap_or("");
        let Some(len) = rest.find(quote) else {
            return self.error(start, "Unterminated string literal");
        };
        let body = rest.get(..len).unwrap_or_default();
        self.pos = body_start + len + 1;
        if quote == '`' {
            return Ok(body.replace('\r', ""));
        }
        unquote(body).or_else(|msg| self.error(start, msg))
    }
}

/// Expands Go escape sequences in a double-quoted string body. As in bexpr, the
/// string ends at the first `"`, so `\"` cannot be used; backticks can.
fn unquote(body: &str) -> Result<String, String> {
    fn digits(chars: &mut std::str::Chars<'_>, n: usize, radix: u32) -> Result<u32, String> {
        let mut value = 0u32;
        for _ in 0..n {
            let d = chars.next().and_then(|c| c.to_digit(radix)).ok_or("invalid escape sequence in string literal")?;
            value = value * radix + d;
        }
        Ok(value)
    }
    let mut out = Vec::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        let byte = match c {
            '\n' => return Err("newline in string literal (use \\n or a `backtick` string)".into()),
            '\\' => match chars.next() {
                None => {
                    return Err("string literal ends with a backslash (\\\" cannot be used inside \
                                double quotes; use a `backtick` string)"
                        .into());
                }
                Some('a') => 7,
                Some('b') => 8,
                Some('f') => 12,
                Some('n') => b'\n',
                Some('r') => b'\r',
                Some('t') => b'\t',
                Some('v') => 11,
                Some('\\') => b'\\',
                Some('x') => digits(&mut chars, 2, 16)? as u8,
                Some(d @ '0'..='7') => {
                    let value = d as u32 - '0' as u32;
                    let value = value * 64 + digits(&mut chars, 2, 8)?;
                    u8::try_from(value).map_err(|_| "octal escape value above 255 in string literal")?
                }
                Some(u @ ('u' | 'U')) => {
                    let code = digits(&mut chars, if u == 'u' { 4 } else { 8 }, 16)?;
                    let ch = char::from_u32(code).ok_or("invalid Unicode escape in string literal")?;
                    out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                    continue;
                }
                Some(other) => {
                    return Err(format!("invalid escape sequence \\{other} in string literal"));
                }
            },
            c => {
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                continue;
            }
        };
        out.push(byte);
    }
    String::from_utf8(out).map_err(|_| "string literal escapes do not form valid UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service() -> Value {
        json!({
            "ID": "redis1", "Service": "redis", "Address": "", "Notes": "x",
            "Tags": ["primary", "production"], "Ports": [80, 443], "NoChecks": [],
            "Meta": {"env": "production", "my key": "v", "": "blank"},
            "Port": 6379, "Weight": 1.5, "EnableTagOverride": false, "TaggedAddresses": null,
            "Proxy": {"Upstreams": []}, "Version": "1.0", "Dotted": "web.frontend",
            "Path": "C:\\dir",
            "Checks": [{"Status": "passing", "Name": "a"}, {"Status": "critical", "Name": "b"}],
        })
    }

    /// One case per line against `service()`: `T expr` must match, `F expr` must not,
    /// `E expr => text` must fail with an error whose message contains `text`.
    fn check(cases: &str) {
        for line in cases.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (kind, rest) = line.split_at(2);
            let (expr, want) = rest.split_once(" => ").unwrap_or((rest, ""));
            let got = Filter::parse(expr).and_then(|f| f.matches(&service()));
            match (kind.trim(), got) {
                ("T", Ok(b)) | ("F", Ok(b)) => assert_eq!(b, kind.trim() == "T", "{line}"),
                ("E", Err(e)) => assert!(e.to_string().contains(want), "{line}: got {e}"),
                (_, got) => panic!("{line}: got {got:?}"),
            }
        }
    }

    #[test]
    fn equality_compares_strings_exactly() {
        check(
            r#"
            T Service == redis
            T Service == "redis"
            T Service == `redis`
            T Address == ""
            T Service != mysql
            F Service == Redis
            F Service == redi
            F Service != redis
            "#,
        );
    }

    #[test]
    fn numbers_and_booleans_coerce_the_literal_to_the_field_type() {
        check(
            r#"
            T Port == 6379
            T Port == "6379"
            T Port == "0x18eb"
            T Port == "014353"
            T Port != 80
            T Weight == 1.5
            T EnableTagOverride == false
            T EnableTagOverride == F
            T EnableTagOverride != 1
            F Port == 6380
            F Port == 6379.5
            F Port == -6379
            F Weight == 1
            F EnableTagOverride == true
            E Port == abc => Failed to coerce value "abc" for selector "Port" to a number
            E EnableTagOverride == yes => to a boolean
            E Ports contains http => Failed to coerce value "http" for selector "Ports"
            "#,
        );
    }

    #[test]
    fn in_and_contains_find_array_elements() {
        check(
            r#"
            T primary in Tags
            T "production" in Tags
            T Tags contains primary
            T 443 in Ports
            T Ports contains "443"
            T 8080 not in Ports
            F qa in Tags
            F Tags contains prim
            F primary not in Tags
            "#,
        );
    }

    #[test]
    fn not_in_excludes_tagged_services() {
        let items = vec![json!({"ID": "a", "Tags": ["primary"]}), json!({"ID": "b", "Tags": ["secondary"]}), json!({"ID": "c", "Tags": []})];
        for expr in [r#""primary" not in Tags"#, "Tags not contains primary"] {
            let kept = apply(expr, items.clone()).unwrap();
            let ids: Vec<_> = kept.iter().map(|i| i["ID"].as_str().unwrap()).collect();
            assert_eq!(ids, ["b", "c"], "{expr}");
        }
    }

    #[test]
    fn in_on_maps_tests_key_presence_and_on_strings_substrings() {
        check(
            r#"
            T env in Meta
            T Meta contains `my key`
            T qa not in Meta
            T dis in Service
            T Service contains edi
            T Service not contains sql
            F production in Meta
            F Meta not contains env
            F sql in Service
            "#,
        );
    }

    #[test]
    fn is_empty_applies_to_arrays_maps_strings_and_null() {
        check(
            r#"
            T NoChecks is empty
            T Address is empty
            T TaggedAddresses is empty
            T Proxy.Upstreams is empty
            T Tags is not empty
            T Meta   is   not   empty
            F Tags is empty
            F Service is empty
            F NoChecks is not empty
            "#,
        );
    }

    #[test]
    fn matches_uses_unanchored_regular_expressions() {
        check(
            r#"
            T Service matches "^re"
            T Service matches dis
            T ID matches `\d$`
            T Meta.env matches "(?i)PROD"
            T Service not matches "^x"
            F Service matches "^dis"
            F Service not matches red
            "#,
        );
        let err = Filter::parse(r#"Service matches "(""#).unwrap_err();
        assert!(matches!(err, FilterError::Parse { column: 17, .. }), "{err}");
        assert!(err.to_string().ends_with(r#"invalid regex "(": unclosed group"#), "{err}");
    }

    #[test]
    fn missing_map_keys_and_nulls_behave_as_absent() {
        check(
            r#"
            T Meta.missing != x
            T Meta.missing is empty
            T x not in Meta.missing
            T Meta.missing not matches x
            T TaggedAddresses.lan != x
            T Proxy.Missing.Deeper is empty
            T Meta["nope"] != ""
            F Meta.missing == ""
            F Meta.missing is not empty
            F x in Meta.missing
            F Meta.missing matches ".*"
            F TaggedAddresses.lan == x
            "#,
        );
    }

    #[test]
    fn unknown_miscased_or_scalar_selectors_are_errors() {
        check(
            r#"
            E Servce == redis => Selector "Servce" is not valid
            E service == redis => Selector "service" is not valid
            E Service.Name == x => Selector "Service.Name" is not valid
            E Tags.Name == x => Selector "Tags.Name" is not valid
            E Port["a b"] == x => Selector "Port["a b"]" is not valid
            "#,
        );
    }

    #[test]
    fn operators_on_the_wrong_type_are_errors() {
        check(
            r#"
            E Tags == primary => Invalid match operator "==" for selector "Tags" holding an array
            E Port matches 6 => holding a number
            E Port is empty => "is empty" for selector "Port"
            E Meta != x => holding an object
            E Checks contains x => holding an array of objects
            E x in Port => "in" for selector "Port"
            "#,
        );
    }

    #[test]
    fn selectors_through_arrays_of_objects_match_any_element() {
        check(
            r#"
            T Checks.Status == passing
            T Checks.Status == critical
            T Checks.Status != passing
            T Checks.Name matches "^b"
            F Checks.Status == warning
            F NoChecks.Status != passing
            "#,
        );
    }

    #[test]
    fn not_binds_tighter_than_and_which_binds_tighter_than_or() {
        check(
            r#"
            F not Service == redis and Port == 1
            T Port == 1 and Port == 2 or Service == redis
            T Service == redis or Port == 1 and Port == 2
            T Port == 1 or not Service == mysql and Port == 6379
            T not not Service == redis
            "#,
        );
    }

    #[test]
    fn parentheses_override_precedence() {
        check(
            "
            F (Service == redis or Port == 1) and Port == 2
            T not (Service == mysql or Port == 1)
            T ((Service == redis))
            T not(Service == mysql)
            T (Port == 1)or(Port == 6379)
            T ( Service == redis\t)\r
            ",
        );
    }

    #[test]
    fn index_syntax_selects_keys_that_are_not_identifiers() {
        check(
            r#"
            T Meta["my key"] == v
            T Meta[`my key`] == v
            T Meta[""] == blank
            T Meta[ "env" ] == production
            T Meta["env"] contains prod
            "#,
        );
    }

    #[test]
    fn string_literals_follow_go_quoting_rules() {
        check(
            r#"
            T Meta["my key"] == "\x76"
            T Meta["my key"] == "\u0076"
            T Meta["my key"] == "\166"
            T Path == `C:\dir`
            T Path == "C:\\dir"
            E Service == "a\qb" => invalid escape sequence \q
            E ID matches "\d" => invalid escape sequence \d
            E Service == "a\" or x" => use a `backtick` string
            E Service == "\xff" => do not form valid UTF-8
            "#,
        );
        assert!(Filter::parse("Service == \"a\nb\"").is_err());
        let raw = Filter::parse("Path == `C:\\d\r\nir`").unwrap();
        assert!(raw.matches(&json!({"Path": "C:\\d\nir"})).unwrap(), "raw strings drop \\r");
    }

    #[test]
    fn bare_words_and_numbers_keep_their_written_text() {
        // bexpr joins every segment of a bare-word value with ".", index syntax included.
        check(
            r#"
            T Version == 1.0
            T Dotted == web.frontend
            T Dotted == web["frontend"]
            F Version == 1
            "#,
        );
    }

    #[test]
    fn keywords_are_case_sensitive_whole_words() {
        check(
            r#"
            T Notes == x and Notes != y
            T Service == notes or Notes == x
            E Service == redis AND Port == 1 => found "AND"
            E NOT Service == redis => expected an operator
            E Service == redis andPort == 1 => found "andPort"
            "#,
        );
    }

    #[test]
    fn parse_errors_report_the_column_and_the_problem() {
        let cases = [
            ("", 1, "empty filter expression"),
            ("   ", 4, "empty filter expression"),
            ("Service ==", 11, r#"expected a value after "==", found end of input"#),
            ("Service = redis", 9, "expected an operator"),
            ("(Service == redis", 18, "unmatched parentheses"),
            ("Service == redis or", 20, r#"expected a selector, a value or "(""#),
            ("Service == redis Port", 18, r#"or end of input, found "Port""#),
            (r#"Service == "redis"#, 12, "Unterminated string literal"),
            ("Port == 01", 9, "Invalid number literal"),
            ("Port == 1.", 9, "Invalid number literal"),
            ("Meta[env] == x", 6, "invalid index"),
            (r#"Meta["env" == x"#, 12, "unclosed index expression"),
            ("Meta. == x", 6, r#"a field name after ".""#),
            ("Service is full", 12, r#"expected "empty", found "full""#),
            ("redis in", 9, r#"a selector after "in""#),
            ("redis in 5", 10, r#"a selector after "in""#),
            ("\"x\" == Service", 5, "expected an operator"),
            ("Service not equals x", 13, r#"expected "in", "contains" or "matches""#),
            ("Servicé == x", 7, r#"found "é""#),
            ("Service == x)", 13, r#"found ")""#),
        ];
        for (expr, column, fragment) in cases {
            match Filter::parse(expr) {
                Err(FilterError::Parse { column: c, message }) => {
                    assert_eq!(c, column, "{expr}: {message}");
                    assert!(message.contains(fragment), "{expr}: {message}");
                }
                other => panic!("{expr}: expected a parse error, got {other:?}"),
            }
        }
    }

    #[test]
    fn garbage_returns_errors_instead_of_panicking() {
        let garbage = "( ) (( \" ` [ ] == not and or Tags[ Tags[\" Tags[`x` - --1 0x é \u{0} \\ \"\\ \
                       \"\\u12 \"\\U0011ffff\"in \"\\400\" is Tags.is Tags.not a.b.c. a..b not.not";
        for expr in garbage.split(' ') {
            assert!(Filter::parse(expr).is_err(), "{expr:?} should not parse");
        }
        // Pseudo-random soup of tokens: whatever parses must also evaluate without panicking.
        let tokens = [
            "(",
            ")",
            "not ",
            " and ",
            " or ",
            "==",
            "!=",
            "\"",
            "`",
            "[",
            "]",
            ".",
            "Tags",
            "Meta",
            "Checks",
            "Status",
            " in ",
            " contains ",
            " is ",
            "empty",
            " matches ",
            "-",
            "0",
            "1.5",
            "é",
            "\\",
            "\n",
            " ",
            "x",
            "\"a\"",
            "`b`",
            "\"(\"",
            "\\u",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut expr = String::new();
            for _ in 0..(seed % 12) {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                expr.push_str(tokens[(seed >> 33) as usize % tokens.len()]);
            }
            if let Ok(filter) = Filter::parse(&expr) {
                let _ = filter.matches(&service());
                let _ = filter.matches(&json!("not an object"));
            }
        }
        let full = r#"Meta["my key"] matches "^v$" and not ("é" in Tags or Port != "0x1")"#;
        for (i, _) in full.char_indices() {
            let _ = Filter::parse(&full[..i]).map(|f| f.matches(&service()));
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        assert!(Filter::parse(&"(".repeat(100_000)).is_err());
        assert!(Filter::parse(&format!("{}Service == x", "not ".repeat(100_000))).is_err());
        check(&format!("T {}Service == redis{}", "(".repeat(60), ")".repeat(60)));
        check(&format!("T {}Service == redis", "Port == 1 or ".repeat(20_000)));
    }

    #[test]
    fn apply_keeps_matching_items_and_reports_errors() {
        let items: Vec<Value> = ["production", "production", "qa"]
            .iter()
            .enumerate()
            .map(|(i, env)| json!({"ID": format!("redis{}", i + 1), "Meta": {"env": env}}))
            .collect();
        let kept = apply(r#"Meta.env == "qa""#, items.clone()).unwrap();
        assert_eq!(kept, vec![items[2].clone()]);
        assert_eq!(apply("", items.clone()).unwrap(), items);
        let err = apply("Bogus == 1", items).unwrap_err();
        assert!(matches!(err, FilterError::InvalidSelector { .. }));
        assert!(matches!(apply("Bogus ==", vec![]), Err(FilterError::Parse { .. })));
    }
}
