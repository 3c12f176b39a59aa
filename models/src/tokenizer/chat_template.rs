//! Chat templates: the Jinja programs shipped with models that turn a conversation into
//! the exact prompt text the model was trained on.
//!
//! Rendered with minijinja set up like Hugging Face's `apply_chat_template`
//! (`trim_blocks`, `lstrip_blocks`, Python string methods, `raise_exception`, a `tojson`
//! that writes what Python's `json.dumps` writes), so a template renders byte-for-byte as
//! it does in `transformers`.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind, State};
use serde::{Deserialize, Serialize};

use super::TokenizerError;

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// ChatML, the fallback for vocabularies that have `<|im_start|>`.
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}";

/// A plain "Role: content" transcript, the fallback when the vocabulary has no chat tokens.
pub const PLAIN_TEMPLATE: &str = "{%- for message in messages %}{%- if message['role'] == 'system' %}{{ 'System: ' }}{%- elif message['role'] == 'user' %}{{ 'User: ' }}{%- elif message['role'] == 'assistant' %}{{ 'Assistant: ' }}{%- else %}{{ message['role'] | capitalize + ': ' }}{%- endif %}{{ message['content'] + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ 'Assistant:' }}{%- endif %}";

/// A compiled chat template with the special-token strings it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The model reasons in `<think>…</think>` blocks (DeepSeek-R1 and its distills):
    /// its template handles `</think>`.
    reasons: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported with its line.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error(&e, true))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string()).map_err(|e| template_error(&e, true))?;
        Ok(Self {
            source: source.to_string(),
            reasons: source.contains("</think>"),
            env,
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
        })
    }

    /// ChatML (`<|im_start|>role\ncontent<|im_end|>\n`).
    pub fn chatml(bos_token: Option<&str>, eos_token: Option<&str>) -> Self {
        Self::new(CHATML_TEMPLATE, bos_token, eos_token).expect("built-in ChatML template compiles")
    }

    /// "System: / User: / Assistant:" transcript.
    pub fn plain(bos_token: Option<&str>, eos_token: Option<&str>) -> Self {
        Self::new(PLAIN_TEMPLATE, bos_token, eos_token).expect("built-in plain template compiles")
    }

    /// The template used when a model ships none: ChatML when the vocabulary knows
    /// `<|im_start|>` (the model was most likely tuned on it), else a plain transcript.
    pub fn fallback(vocab_has_im_start: bool, bos_token: Option<&str>, eos_token: Option<&str>) -> Self {
        if vocab_has_im_start { Self::chatml(bos_token, eos_token) } else { Self::plain(bos_token, eos_token) }
    }

    /// Renders the conversation; `add_generation_prompt` appends the header that makes the
    /// model answer as the assistant.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TokenizerError> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| template_error(&e, false))?;
        // Absent special tokens stay undefined (render as ""), as in transformers, rather
        // than `none`.
        let mut ctx = std::collections::BTreeMap::new();
        ctx.insert(Value::from("messages"), Value::from(minijinja::value::Serde(messages)));
        ctx.insert(Value::from("add_generation_prompt"), Value::from(add_generation_prompt));
        ctx.insert(Value::from("tools"), Value::from(()));
        if let Some(bos) = &self.bos_token {
            ctx.insert(Value::from("bos_token"), Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            ctx.insert(Value::from("eos_token"), Value::from(eos.as_str()));
        }
        template.render(Value::from(ctx)).map_err(|e| template_error(&e, false))
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the model writes its reasoning in `<think>…</think>` before the answer.
    pub fn reasons(&self) -> bool {
        self.reasons
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
}

fn template_error(err: &Error, compile: bool) -> TokenizerError {
    let mut message = match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    };
    // Errors raised inside called functions (raise_exception) carry their own cause.
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    if compile {
        TokenizerError::TemplateSyntax { line: err.line(), message }
    } else {
        TokenizerError::TemplateRender { line: err.line(), message }
    }
}

/// Templates call `raise_exception("...")` to reject conversations they cannot format
/// (e.g. roles that do not alternate).
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as `transformers` defines it: `json.dumps(x, ensure_ascii=False, indent=...)`,
/// so `", "`/`": "` separators and no HTML escaping (minijinja's own escapes `<>&'`).
fn tojson(_state: &State, value: &Value, args: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = args.get("indent")?;
    let sort_keys: Option<bool> = args.get("sort_keys")?;
    // Accepted for compatibility; output is always non-ASCII-escaped with Python's separators.
    let _: Option<Value> = args.get("ensure_ascii")?;
    let _: Option<Value> = args.get("separators")?;
    args.assert_all_used()?;
    let mut out = Vec::new();
    let result = if sort_keys == Some(true) {
        let sorted: serde_json::Value =
            serde_json::to_value(value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
        // serde_json's Map without `preserve_order` is a BTreeMap: sorted keys.
        write_json(&mut out, &sort_json(sorted), indent)
    } else {
        write_json(&mut out, value, indent)
    };
    result.map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = String::from_utf8(out).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(text))
}

fn sort_json(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sort_json(v))).collect())
        }
        serde_json::Value::Array(items) => serde_json::Value::Array(items.into_iter().map(sort_json).collect()),
        other => other,
    }
}

fn write_json<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    value: &T,
    indent: Option<usize>,
) -> Result<(), serde_json::Error> {
    match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let formatter = serde_json::ser::PrettyFormatter::with_indent(&pad);
            value.serialize(&mut serde_json::Serializer::with_formatter(out, formatter))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(out, PythonCompactFormatter)),
    }
}

/// Python's default `json.dumps` separators: `", "` between items, `": "` after keys.
struct PythonCompactFormatter;

impl serde_json::ser::Formatter for PythonCompactFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-Instruct's template (tokenizer_config.json `chat_template`).
    const QWEN25: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

    /// Meta-Llama-3-Instruct's template.
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}";

    /// DeepSeek-R1's template (the revision whose generation prompt opens `<think>`).
    const DEEPSEEK_R1: &str = "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}";

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::system("You are terse."),
            ChatMessage::user("Hi!"),
            ChatMessage::assistant("<think>\nThey greet me.\n</think>\n\nHello."),
            ChatMessage::user("What is 2+2?"),
        ]
    }

    #[test]
    fn qwen25_renders_like_transformers() {
        let t = ChatTemplate::new(QWEN25, None, Some("<|im_end|>")).unwrap();
        let out = t.render(&conversation(), true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are terse.<|im_end|>\n\
             <|im_start|>user\nHi!<|im_end|>\n\
             <|im_start|>assistant\n<think>\nThey greet me.\n</think>\n\nHello.<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // Without a system message Qwen2.5 adds its default one.
        let out = t.render(&[ChatMessage::user("Hi")], false).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn llama3_renders_like_transformers() {
        let t = ChatTemplate::new(LLAMA3, Some("<|begin_of_text|>"), Some("<|eot_id|>")).unwrap();
        let msgs = [ChatMessage::system("  Be brief.  "), ChatMessage::user("Hello\n")];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn deepseek_r1_renders_like_transformers() {
        let t = ChatTemplate::new(DEEPSEEK_R1, Some("<｜begin▁of▁sentence｜>"), Some("<｜end▁of▁sentence｜>")).unwrap();
        assert_eq!(
            t.render(&conversation(), true).unwrap(),
            "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hi!\
             <｜Assistant｜>\n\nHello.<｜end▁of▁sentence｜>\
             <｜User｜>What is 2+2?<｜Assistant｜><think>\n"
        );
        assert_eq!(t.render(&[ChatMessage::user("x")], false).unwrap(), "<｜begin▁of▁sentence｜><｜User｜>x");
        assert!(t.reasons(), "R1 reasons in <think> blocks");
        assert!(!ChatTemplate::chatml(None, None).reasons());
    }

    #[test]
    fn fallbacks() {
        let msgs = [ChatMessage::system("S"), ChatMessage::user("U")];
        assert_eq!(
            ChatTemplate::fallback(true, None, None).render(&msgs, true).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            ChatTemplate::fallback(false, None, None).render(&msgs, true).unwrap(),
            "System: S\nUser: U\nAssistant:"
        );
    }

    #[test]
    fn syntax_error_reports_line() {
        let err = ChatTemplate::new("line one\n{% if %}\n", None, None).unwrap_err();
        match err {
            TokenizerError::TemplateSyntax { line, .. } => assert_eq!(line, Some(2)),
            other => panic!("unexpected {other:?}"),
        }
        assert!(err_string("{% for x in %}").contains("line 1"));
    }

    fn err_string(src: &str) -> String {
        ChatTemplate::new(src, None, None).unwrap_err().to_string()
    }

    #[test]
    fn raise_exception_is_a_render_error() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}ok",
            None,
            None,
        )
        .unwrap();
        let err = t.render(&[ChatMessage::assistant("x")], false).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, TokenizerError::TemplateRender { .. }), "{text}");
        assert!(text.contains("Conversation roles must alternate"), "{text}");
        assert_eq!(t.render(&[ChatMessage::user("x")], false).unwrap(), "ok");
    }

    #[test]
    fn python_string_methods_and_tojson() {
        let t = ChatTemplate::new(
            "{{ messages[0].content.strip().split(',')[-1].startswith('b') }} {{ {'a': [1, 'x<y']} | tojson }} {{ {'k': 1} | tojson(indent=2) }}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::user(" a,b ")], false).unwrap(),
            "True {\"a\": [1, \"x<y\"]} {\n  \"k\": 1\n}"
        );
    }
}
