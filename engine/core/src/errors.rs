//! How errors are shown to users.

/// `err` and its sources, joined with ": " as anyhow's `{:#}` joins them, leaving out a source
/// whose text is there already. rbuild's error types name their source in their own message
/// and also keep it as [`std::error::Error::source`] (for code that looks for a cause, such as
/// [`crate::nospace`]): printing every level of the chain would repeat it.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let cause = e.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        cur = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct Named {
        path: String,
        source: std::io::Error,
    }

    #[test]
    fn a_source_named_in_its_message_is_not_repeated_and_context_is_kept() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let cause = io.to_string();
        let err = anyhow::Error::new(Named {
            path: "/x".into(),
            source: io,
        })
        .context("opening the store");
        assert_eq!(
            chain(err.as_ref()),
            format!("opening the store: /x: {cause}")
        );
        // A source its error does not name is printed, as `{:#}` prints it.
        let err = anyhow::anyhow!("inner").context("outer");
        assert_eq!(chain(err.as_ref()), "outer: inner");
    }
}
