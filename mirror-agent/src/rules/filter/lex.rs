//! Words and operators of a filter expression, with their byte offsets.

use super::FilterError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// A keyword, number, address, prefix or range: `host`, `443`, `10.0.0.0/8`, `1-1023`, `\tcp`.
    Word(String),
    Open,
    Close,
    Not,
    And,
    Or,
}

/// A token and the byte offset it starts at.
pub type Located = (Token, usize);

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '/' | '-' | '_' | '\\')
}

/// Splits `text` into tokens; `and`, `or` and `not` are operators wherever they stand.
pub fn tokens(text: &str) -> Result<Vec<Located>, FilterError> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        let token = match c {
            c if c.is_whitespace() => continue,
            '(' => Token::Open,
            ')' => Token::Close,
            '!' if chars.peek().is_some_and(|(_, n)| *n == '=') => {
                return Err(unsupported_operator(at));
            }
            '!' => Token::Not,
            '&' | '|' => {
                if chars.next_if(|(_, n)| *n == c).is_none() {
                    return Err(unsupported_operator(at));
                }
                if c == '&' { Token::And } else { Token::Or }
            }
            '[' => {
                return Err(FilterError::at(
                    at,
                    "packet data accessors such as `tcp[13]` or `ether[0]` are not supported: \
                     rules match fields (hosts, nets, ports, protocols, VLANs), not bytes",
                ));
            }
            '=' | '<' | '>' | '+' | '*' | '%' | '^' => return Err(unsupported_operator(at)),
            c if is_word_char(c) => {
                let mut end = at + c.len_utf8();
                while let Some((i, n)) = chars.next_if(|(_, n)| is_word_char(*n)) {
                    end = i + n.len_utf8();
                }
                match &text[at..end] {
                    "and" => Token::And,
                    "or" => Token::Or,
                    "not" => Token::Not,
                    word => Token::Word(word.to_owned()),
                }
            }
            other => {
                return Err(FilterError::at(
                    at,
                    format!("unexpected character `{other}`"),
                ));
            }
        };
        out.push((token, at));
    }
    Ok(out)
}

fn unsupported_operator(at: usize) -> FilterError {
    FilterError::at(
        at,
        "arithmetic and comparisons (`&`, `!=`, `<`, `len > 100`) are not supported; \
         combine primitives with and (&&), or (||), not (!) and parentheses",
    )
}

#[cfg(test)]
mod tests {
    use super::{Token, tokens};

    #[test]
    fn words_operators_and_offsets() {
        let found = tokens("tcp port 443 && !(host fe80::1||net 10.0.0.0/8)").expect("valid");
        let kinds: Vec<_> = found.iter().map(|(t, _)| t.clone()).collect();
        let word = |w: &str| Token::Word(w.to_owned());
        assert_eq!(
            kinds,
            [
                word("tcp"),
                word("port"),
                word("443"),
                Token::And,
                Token::Not,
                Token::Open,
                word("host"),
                word("fe80::1"),
                Token::Or,
                word("net"),
                word("10.0.0.0/8"),
                Token::Close,
            ]
        );
        assert_eq!(found[3].1, 13, "`&&` starts at byte 13");
    }

    #[test]
    fn operators_outside_the_subset_are_refused_where_they_stand() {
        for (text, at) in [
            ("tcp[13] & 2 != 0", 3),
            ("len > 100", 4),
            ("port 1 & 2", 7),
            ("port 80 != 1", 8),
            ("host 10.0.0.1 | host 10.0.0.2", 14),
            ("port 80 ; port 81", 8),
        ] {
            let error = tokens(text).expect_err(text);
            assert_eq!(error.offset, at, "{text}: {error}");
        }
    }
}
