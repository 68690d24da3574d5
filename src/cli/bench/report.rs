//! The bench's result table: plain text for a terminal, Markdown for docs/benchmarks.md.

/// Rows of (measurement, figure, ratio or target).
pub(super) struct Table {
    title: String,
    rows: Vec<(String, String, String)>,
}

impl Table {
    pub(super) fn new(title: String) -> Table {
        Table {
            title,
            rows: Vec::new(),
        }
    }

    pub(super) fn row(
        &mut self,
        what: impl Into<String>,
        figure: impl Into<String>,
        ratio: impl Into<String>,
    ) {
        self.rows.push((what.into(), figure.into(), ratio.into()));
    }

    /// Prints the table as aligned text, then (with `markdown`) as a Markdown table.
    pub(super) fn print(&self, markdown: bool) {
        println!("{}", self.title);
        let w1 = self.rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
        let w2 = self.rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
        for (a, b, c) in &self.rows {
            println!("{a:<w1$}  {b:<w2$}  {c}");
        }
        if markdown {
            println!();
            println!("| {} | figure | ratio |", self.title);
            println!("|---|---|---|");
            for (a, b, c) in &self.rows {
                println!("| {a} | {b} | {c} |");
            }
        }
    }
}
