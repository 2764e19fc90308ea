//! A terminal note app that embeds tandem as an application would: a list of notes, an editor
//! for one, a live sync status line, other people's carets in their colours, and a screen that
//! settles conflicts on a critical field.
//!
//! ```text
//! cargo run --example notes -- --data ./ada --name ada --relay ws://127.0.0.1:7878
//! ```
//!
//! Keys. List: Up/Down choose, Enter edit, `n` new note, `t` set the title, `c` settle a
//! conflict, `q` quit. Editor: type, Backspace, Delete, Left/Right/Home/End, Enter for a new
//! line, Esc back to the list. Conflict screen: `1`..`9` keep that version, `m` type a merged
//! value (Enter to save), Esc back.
//!
//! How it uses tandem: the body on screen is kept up to date by applying each change event's
//! patches (never re-reading the document on a change); the caret is a stable cursor, so it
//! stays on its character when others type; presence carries the caret to the others; the
//! status line comes from document metadata, the connection state and progress events.

use std::io::Stdout;
use std::time::{Duration, Instant};

use clap::Parser;
use crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::terminal::{self, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::backend::CrosstermBackend;
use ratatui::layout::{Constraint, Direction as Dir, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, List, ListItem, ListState, Paragraph, Wrap};
use ratatui::{Frame, Terminal};
use serde_json::json;
use tandem::client::{SyncConfig, SyncHandle};
use tandem::{
    ConnState, Direction, DocId, Event, FieldConflict, PatchAction, PathElem, Presence, Repo,
    RepoOptions, Schema, Selection, TextCursor,
};
use tokio::sync::broadcast::error::TryRecvError;

const SCHEMA: &str = r#"
version = 1
[types.note]
title = "critical"
body  = "text"
"#;

/// A status word stays on screen at least this long, so that a person (or a test reading the
/// screen) can see a short "syncing" before "synced".
const HOLD: Duration = Duration::from_millis(700);

#[derive(Parser)]
#[command(about = "A terminal note app on tandem")]
struct Args {
    /// The store folder.
    #[arg(long, default_value = "./notes-data")]
    data: std::path::PathBuf,
    /// Your name, shown to others and recorded on your changes.
    #[arg(long, default_value = "me")]
    name: String,
    /// Your colour, as RRGGBB hex.
    #[arg(long, default_value = "3366ff")]
    color: String,
    /// The relay (`ws://host:port`); without one the app works offline.
    #[arg(long)]
    relay: Option<String>,
    /// A token for the relay.
    #[arg(long)]
    token: Option<String>,
    /// The longest pause between reconnection attempts, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    reconnect_max_ms: u64,
}

enum Mode {
    List,
    Edit,
    /// Typing a title: for the selected note, or a new one.
    Title {
        new: bool,
        input: String,
    },
    /// Settling a conflict; `merged` holds a value being typed.
    Conflict {
        merged: Option<String>,
    },
}

struct App {
    repo: Repo,
    sync: Option<SyncHandle>,
    events: tokio::sync::broadcast::Receiver<Event>,
    me: Presence,
    notes: Vec<(DocId, String)>,
    selected: usize,
    mode: Mode,
    /// The note being edited, its body as kept by patches, and the caret.
    open: Option<DocId>,
    body: Vec<char>,
    caret: Option<TextCursor>,
    /// Latest progress per direction: (changes done, changes total).
    upload: (u64, u64),
    download: (u64, u64),
    /// When the last transfer was reported: a push or pull between two frames still shows.
    transferred: Option<Instant>,
    /// The status text on screen, its kind, and since when.
    shown: (String, &'static str, Instant),
    message: String,
    quit: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let schema = Schema::from_toml(SCHEMA)?;
    let repo = Repo::open(&args.data, RepoOptions::new(&args.name).schema(schema))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let events = repo.subscribe();
    let sync = args.relay.as_ref().map(|url| {
        let _in_runtime = rt.enter();
        let mut cfg = SyncConfig::new(url);
        if let Some(t) = &args.token {
            cfg = cfg.token(t);
        }
        cfg.backoff.base = Duration::from_millis(200);
        cfg.backoff.cap = Duration::from_millis(args.reconnect_max_ms);
        repo.connect(cfg)
    });
    let color = u32::from_str_radix(args.color.trim_start_matches('#'), 16).unwrap_or(0x3366ff);
    let mut app = App {
        me: Presence {
            name: args.name.clone(),
            color,
            selection: None,
        },
        repo,
        sync,
        events,
        notes: Vec::new(),
        selected: 0,
        mode: Mode::List,
        open: None,
        body: Vec::new(),
        caret: None,
        upload: (0, 0),
        download: (0, 0),
        transferred: None,
        shown: (String::new(), "", Instant::now() - HOLD),
        message: String::new(),
        quit: false,
    };
    app.reload_notes();

    terminal::enable_raw_mode()?;
    crossterm::execute!(std::io::stdout(), EnterAlternateScreen)?;
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_terminal();
        default_hook(info);
    }));
    let mut term = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    let result = run(&mut app, &mut term);
    restore_terminal();
    if let Some(sync) = app.sync.take() {
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(3), sync.stop()).await;
        });
    }
    result
}

fn restore_terminal() {
    let _ = terminal::disable_raw_mode();
    let _ = crossterm::execute!(std::io::stdout(), LeaveAlternateScreen);
}

fn run(app: &mut App, term: &mut Terminal<CrosstermBackend<Stdout>>) -> anyhow::Result<()> {
    while !app.quit {
        app.take_events();
        term.draw(|f| app.draw(f))?;
        if event::poll(Duration::from_millis(100))? {
            if let TermEvent::Key(k) = event::read()? {
                if k.kind != KeyEventKind::Release {
                    if let Err(e) = app.key(k.code, k.modifiers) {
                        app.message = e.to_string();
                    }
                }
            }
        }
    }
    Ok(())
}

impl App {
    fn reload_notes(&mut self) {
        let mut notes: Vec<(DocId, String)> = self
            .repo
            .list(Some("note"), false)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(id, _)| {
                let e = self.repo.get(&id).ok()?;
                let title = e.value["title"]
                    .as_str()
                    .unwrap_or("(untitled)")
                    .to_string();
                Some((id, title))
            })
            .collect();
        notes.sort_by(|a, b| (&a.1, a.0.to_string()).cmp(&(&b.1, b.0.to_string())));
        self.notes = notes;
        if self.selected >= self.notes.len() {
            self.selected = self.notes.len().saturating_sub(1);
        }
    }

    fn selected_id(&self) -> Option<DocId> {
        self.notes.get(self.selected).map(|n| n.0)
    }

    /// Read the open note's body afresh (on opening it, or after missing events).
    fn reload_body(&mut self) {
        if let Some(id) = self.open {
            let e = self.repo.get(&id);
            self.body = e
                .ok()
                .and_then(|e| e.value["body"].as_str().map(|s| s.chars().collect()))
                .unwrap_or_default();
        }
    }

    /// Apply what the repo reports: patches to the open body, a fresh note list on any
    /// change, progress for the status line.
    fn take_events(&mut self) {
        let mut changed = false;
        loop {
            match self.events.try_recv() {
                Ok(Event::Changed { doc, patches, .. }) => {
                    changed = true;
                    if Some(doc) == self.open {
                        for p in patches.iter() {
                            self.apply_patch(p);
                        }
                    }
                }
                Ok(Event::Progress {
                    direction,
                    changes_done,
                    changes_total,
                    ..
                }) => {
                    if changes_total > 0 {
                        self.transferred = Some(Instant::now());
                    }
                    match direction {
                        Direction::Upload => self.upload = (changes_done, changes_total),
                        Direction::Download => self.download = (changes_done, changes_total),
                    }
                }
                Ok(_) => {}
                Err(TryRecvError::Lagged(_)) => {
                    changed = true;
                    self.reload_body();
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Closed) => break,
            }
        }
        if changed {
            self.reload_notes();
        }
    }

    /// Keep the body on screen in step with one patch of the open note.
    fn apply_patch(&mut self, p: &tandem::Patch) {
        let body = PathElem::Key("body".into());
        match (&p.path[..], &p.action) {
            ([f], PatchAction::SpliceText { index, text }) if *f == body => {
                let at = (*index).min(self.body.len());
                self.body.splice(at..at, text.chars());
            }
            (
                [f],
                PatchAction::Delete {
                    prop: PathElem::Index(i),
                    length,
                },
            ) if *f == body => {
                let start = (*i).min(self.body.len());
                let end = (i + length).min(self.body.len());
                self.body.drain(start..end);
            }
            // A new body object replaces the old one.
            ([], PatchAction::Put { prop, .. }) if *prop == body => self.reload_body(),
            _ => {}
        }
    }

    fn caret_pos(&self) -> usize {
        match (self.open, &self.caret) {
            (Some(id), Some(c)) => self
                .repo
                .cursor_position(&id, "body", c)
                .unwrap_or(self.body.len()),
            _ => self.body.len(),
        }
    }

    fn set_caret(&mut self, pos: usize) {
        let Some(id) = self.open else { return };
        self.caret = self.repo.cursor(&id, "body", pos).ok();
        if let Some(c) = &self.caret {
            self.me.selection = Some(Selection {
                field: "body".into(),
                anchor: c.clone(),
                head: c.clone(),
            });
            self.repo.set_presence(&id, Some(self.me.clone()));
        }
    }

    fn conflicts_of(&self, id: &DocId) -> Vec<FieldConflict> {
        self.repo.conflicts(id, false).unwrap_or_default()
    }

    fn key(&mut self, code: KeyCode, mods: KeyModifiers) -> Result<(), tandem::Error> {
        if mods.contains(KeyModifiers::CONTROL) && code == KeyCode::Char('c') {
            self.quit = true;
            return Ok(());
        }
        self.message.clear();
        match &mut self.mode {
            Mode::List => match code {
                KeyCode::Char('q') => self.quit = true,
                KeyCode::Up => self.selected = self.selected.saturating_sub(1),
                KeyCode::Down if self.selected + 1 < self.notes.len() => self.selected += 1,
                KeyCode::Char('n') => {
                    self.mode = Mode::Title {
                        new: true,
                        input: String::new(),
                    }
                }
                KeyCode::Char('t') if self.selected_id().is_some() => {
                    self.mode = Mode::Title {
                        new: false,
                        input: String::new(),
                    }
                }
                KeyCode::Char('c') => {
                    if let Some(id) = self.selected_id() {
                        if !self.conflicts_of(&id).is_empty() {
                            self.mode = Mode::Conflict { merged: None };
                        }
                    }
                }
                KeyCode::Enter => {
                    if let Some(id) = self.selected_id() {
                        self.open = Some(id);
                        self.reload_body();
                        let end = self.body.len();
                        self.set_caret(end);
                        self.mode = Mode::Edit;
                    }
                }
                _ => {}
            },
            Mode::Title { new, input } => match code {
                KeyCode::Esc => self.mode = Mode::List,
                KeyCode::Backspace => {
                    input.pop();
                }
                KeyCode::Char(c) => input.push(c),
                KeyCode::Enter => {
                    let (new, title) = (*new, std::mem::take(input));
                    self.mode = Mode::List;
                    if new {
                        let id = self.repo.create("note", json!({"title": title}))?;
                        self.reload_notes();
                        if let Some(i) = self.notes.iter().position(|n| n.0 == id) {
                            self.selected = i;
                        }
                    } else if let Some(id) = self.selected_id() {
                        self.repo
                            .change(&id, |tx| tx.set("title", title.as_str()))?;
                        self.reload_notes();
                    }
                }
                _ => {}
            },
            Mode::Edit => {
                let Some(id) = self.open else {
                    self.mode = Mode::List;
                    return Ok(());
                };
                let pos = self.caret_pos();
                match code {
                    KeyCode::Esc => {
                        self.repo.set_presence(&id, None);
                        self.open = None;
                        self.caret = None;
                        self.mode = Mode::List;
                    }
                    KeyCode::Char(c) => self.insert(id, pos, &c.to_string())?,
                    KeyCode::Enter => self.insert(id, pos, "\n")?,
                    KeyCode::Backspace if pos > 0 => {
                        self.repo
                            .change(&id, |tx| tx.splice_text("body", pos - 1, 1, ""))?;
                        self.take_events();
                        self.set_caret(pos - 1);
                    }
                    KeyCode::Delete if pos < self.body.len() => {
                        self.repo
                            .change(&id, |tx| tx.splice_text("body", pos, 1, ""))?;
                        self.take_events();
                        self.set_caret(pos);
                    }
                    KeyCode::Left => self.set_caret(pos.saturating_sub(1)),
                    KeyCode::Right => self.set_caret((pos + 1).min(self.body.len())),
                    KeyCode::Home => self.set_caret(0),
                    KeyCode::End => self.set_caret(self.body.len()),
                    _ => {}
                }
            }
            Mode::Conflict { .. } => self.conflict_key(code)?,
        }
        Ok(())
    }

    fn conflict_key(&mut self, code: KeyCode) -> Result<(), tandem::Error> {
        let Some(id) = self.selected_id() else {
            self.mode = Mode::List;
            return Ok(());
        };
        let conflicts = self.conflicts_of(&id);
        let Some(c) = conflicts.first() else {
            self.mode = Mode::List;
            return Ok(());
        };
        let Mode::Conflict { merged } = &mut self.mode else {
            return Ok(());
        };
        match (merged.as_mut(), code) {
            (None, KeyCode::Esc) => self.mode = Mode::List,
            (None, KeyCode::Char('m')) => *merged = Some(String::new()),
            (None, KeyCode::Char(d)) if d.is_ascii_digit() => {
                let n = d.to_digit(10).unwrap_or(0) as usize;
                if let Some(v) = n.checked_sub(1).and_then(|i| c.versions.get(i)) {
                    self.repo.resolve(&id, &c.field, v.value.clone())?;
                    self.mode = Mode::List;
                }
            }
            (Some(_), KeyCode::Esc) => *merged = None,
            (Some(m), KeyCode::Backspace) => {
                m.pop();
            }
            (Some(m), KeyCode::Char(ch)) => m.push(ch),
            (Some(m), KeyCode::Enter) => {
                let value = json!(std::mem::take(m));
                self.repo.resolve(&id, &c.field, value)?;
                self.mode = Mode::List;
            }
            _ => {}
        }
        self.reload_notes();
        Ok(())
    }

    fn insert(&mut self, id: DocId, pos: usize, text: &str) -> Result<(), tandem::Error> {
        self.repo
            .change(&id, |tx| tx.splice_text("body", pos, 0, text))?;
        self.take_events();
        self.set_caret(pos + text.chars().count());
        Ok(())
    }

    // ---- drawing ----------------------------------------------------------------------

    fn draw(&mut self, f: &mut Frame) {
        let rows = Layout::default()
            .direction(Dir::Vertical)
            .constraints([
                Constraint::Min(3),
                Constraint::Length(1),
                Constraint::Length(1),
            ])
            .split(f.area());
        match self.mode {
            Mode::Conflict { .. } => self.draw_conflict(f, rows[0]),
            _ => {
                let cols = Layout::default()
                    .direction(Dir::Horizontal)
                    .constraints([Constraint::Length(28), Constraint::Min(20)])
                    .split(rows[0]);
                self.draw_list(f, cols[0]);
                self.draw_editor(f, cols[1]);
            }
        }
        let status = self.status_line();
        f.render_widget(
            Paragraph::new(status).style(Style::default().add_modifier(Modifier::REVERSED)),
            rows[1],
        );
        let help = match &self.mode {
            Mode::List => "Enter edit  n new  t title  c conflict  q quit".to_string(),
            Mode::Edit => "type to edit  arrows move  Esc back".to_string(),
            Mode::Title { input, .. } => format!("title: {input}_  (Enter save, Esc cancel)"),
            Mode::Conflict { merged: None } => "1-9 keep that version  m merge  Esc back".into(),
            Mode::Conflict { merged: Some(m) } => format!("merged: {m}_  (Enter save)"),
        };
        let help = if self.message.is_empty() {
            help
        } else {
            format!("{}  |  {help}", self.message)
        };
        f.render_widget(Paragraph::new(help), rows[2]);
    }

    fn draw_list(&self, f: &mut Frame, area: Rect) {
        let items: Vec<ListItem> = self
            .notes
            .iter()
            .map(|(id, title)| {
                let mark = if self.conflicts_of(id).is_empty() {
                    "  "
                } else {
                    "! "
                };
                ListItem::new(format!("{mark}{title}"))
            })
            .collect();
        let mut state = ListState::default();
        if !self.notes.is_empty() {
            state.select(Some(self.selected));
        }
        let list = List::new(items)
            .block(Block::default().borders(Borders::ALL).title("Notes"))
            .highlight_style(Style::default().add_modifier(Modifier::REVERSED));
        f.render_stateful_widget(list, area, &mut state);
    }

    fn draw_editor(&self, f: &mut Frame, area: Rect) {
        let Some(id) = self.open.or(self.selected_id()) else {
            let p = Paragraph::new("No notes yet: press n")
                .block(Block::default().borders(Borders::ALL));
            f.render_widget(p, area);
            return;
        };
        let editing = self.open.is_some();
        let title = self
            .notes
            .iter()
            .find(|n| n.0 == id)
            .map(|n| n.1.clone())
            .unwrap_or_default();
        // Carets: mine, then the others' in their colours.
        let mut carets: Vec<(usize, Color)> = Vec::new();
        let mut here = Vec::new();
        for p in self.repo.presence(&id) {
            let Some(sel) = &p.presence.selection else {
                continue;
            };
            if sel.field != "body" {
                continue;
            }
            if let Ok(pos) = self.repo.cursor_position(&id, "body", &sel.head) {
                let c = p.presence.color;
                carets.push((pos, Color::Rgb((c >> 16) as u8, (c >> 8) as u8, c as u8)));
                here.push(format!("{}@{pos}", p.presence.name));
            }
        }
        let body: Vec<char> = if editing {
            self.body.clone()
        } else {
            self.repo
                .get(&id)
                .ok()
                .and_then(|e| e.value["body"].as_str().map(|s| s.chars().collect()))
                .unwrap_or_default()
        };
        let mine = editing.then(|| self.caret_pos());
        let mut lines: Vec<Line> = Vec::new();
        let mut spans: Vec<Span> = Vec::new();
        for i in 0..=body.len() {
            let ch = body.get(i).copied();
            let mut style = Style::default();
            if let Some((_, color)) = carets.iter().find(|(p, _)| *p == i) {
                style = style.bg(*color).fg(Color::White);
            }
            if mine == Some(i) {
                style = style.add_modifier(Modifier::REVERSED);
            }
            let shown = match ch {
                Some('\n') | None => ' ',
                Some(c) => c,
            };
            if ch.is_some() || style != Style::default() {
                spans.push(Span::styled(shown.to_string(), style));
            }
            if ch == Some('\n') || ch.is_none() {
                lines.push(Line::from(std::mem::take(&mut spans)));
            }
        }
        let mut head = vec![Line::from(Span::styled(
            format!("Title: {title}"),
            Style::default().add_modifier(Modifier::BOLD),
        ))];
        head.push(Line::from(if here.is_empty() {
            "Here: only you".to_string()
        } else {
            format!("Here: {}", here.join(", "))
        }));
        head.push(Line::from(""));
        head.extend(lines);
        let block =
            Block::default()
                .borders(Borders::ALL)
                .title(if editing { "Editing" } else { "Note" });
        f.render_widget(
            Paragraph::new(head).block(block).wrap(Wrap { trim: false }),
            area,
        );
    }

    fn draw_conflict(&self, f: &mut Frame, area: Rect) {
        let Some(id) = self.selected_id() else { return };
        let conflicts = self.conflicts_of(&id);
        let Some(c) = conflicts.first() else {
            f.render_widget(Paragraph::new("No conflict left."), area);
            return;
        };
        let rows = Layout::default()
            .direction(Dir::Vertical)
            .constraints([Constraint::Length(2), Constraint::Min(3)])
            .split(area);
        f.render_widget(
            Paragraph::new(format!(
                "Conflict on '{}': devices wrote different values at the same time. Keep one:",
                c.field
            )),
            rows[0],
        );
        let n = c.versions.len().max(1) as u32;
        let cols = Layout::default()
            .direction(Dir::Horizontal)
            .constraints(vec![Constraint::Ratio(1, n); n as usize])
            .split(rows[1]);
        for (i, (v, area)) in c.versions.iter().zip(cols.iter()).enumerate() {
            let value = match &v.value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let text = vec![
                Line::from(Span::styled(
                    value,
                    Style::default().add_modifier(Modifier::BOLD),
                )),
                Line::from(""),
                Line::from(format!(
                    "by {}",
                    v.author
                        .clone()
                        .unwrap_or_else(|| v.actor[..8.min(v.actor.len())].into())
                )),
                Line::from(format!("at {}", clock(v.time))),
                Line::from(format!("change {}", &v.hash[..8.min(v.hash.len())])),
            ];
            f.render_widget(
                Paragraph::new(text)
                    .block(Block::default().borders(Borders::ALL).title(format!(
                        "[{}] version {}",
                        i + 1,
                        i + 1
                    )))
                    .wrap(Wrap { trim: false }),
                *area,
            );
        }
    }

    /// The sync indicator: offline / pending N, oldest age / syncing with progress / synced,
    /// then any conflict. Each word stays up at least [`HOLD`].
    fn status_line(&mut self) -> String {
        let conn = self
            .sync
            .as_ref()
            .map(|s| s.state())
            .unwrap_or(ConnState::Offline);
        let (mut pending, mut oldest_ms) = (0u64, 0i64);
        let mut conflicted = Vec::new();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        for (id, title) in &self.notes {
            if let Ok(m) = self.repo.meta(id) {
                pending += m.pending;
                if let Some(t) = m.oldest_pending_ms {
                    oldest_ms = oldest_ms.max(now_ms - t);
                }
            }
            for c in self.conflicts_of(id) {
                conflicted.push(format!("{title}.{}", c.field));
            }
        }
        let transferring = |p: (u64, u64)| p.0 < p.1;
        if conn == ConnState::Online && pending == 0 && self.shown.1 == "pending" {
            // Changes that waited were just acknowledged: that was a sync, however quick (its
            // progress event may still be on its way).
            self.transferred = Some(Instant::now());
        }
        let just_moved = self.transferred.is_some_and(|t| t.elapsed() < HOLD);
        let (kind, text) = match conn {
            ConnState::Online if pending > 0 || transferring(self.download) || just_moved => {
                let (d, t) = if transferring(self.download) || self.upload.1 == 0 {
                    self.download
                } else {
                    self.upload
                };
                ("syncing", format!("syncing {d}/{t} changes"))
            }
            ConnState::Online => ("synced", "synced".to_string()),
            _ if pending > 0 => (
                "pending",
                format!("pending {pending}, oldest {}s", (oldest_ms.max(0) / 1000)),
            ),
            _ => ("offline", "offline".to_string()),
        };
        let conn_word = match conn {
            ConnState::Online => "online",
            ConnState::Connecting => "connecting",
            ConnState::Offline => "offline",
        };
        if kind == self.shown.1 || self.shown.2.elapsed() >= HOLD {
            if kind != self.shown.1 {
                self.shown.2 = Instant::now();
            }
            self.shown.0 = text;
            self.shown.1 = kind;
        }
        let conflict = if conflicted.is_empty() {
            String::new()
        } else {
            format!(" | CONFLICT: {} (press c)", conflicted.join(", "))
        };
        format!(" {} | {conn_word}{conflict}", self.shown.0)
    }
}

/// `HH:MM:SS UTC` of a change time (seconds since the epoch).
fn clock(secs: i64) -> String {
    let s = secs.rem_euclid(86_400);
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}
