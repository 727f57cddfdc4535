// Deck.cpp: see Deck.hpp. One list of keys (visit_deck) drives reading,
// printing and the unknown-key check, so the three cannot drift apart.
#include "io/Deck.hpp"

#include "io/InputError.hpp"

#include <toml++/toml.h>

#include <algorithm>
#include <charconv>
#include <climits>
#include <cstdio>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <tuple>
#include <type_traits>
#include <utility>

namespace hexamoe {

namespace {

namespace fs = std::filesystem;

// ---- enumerated keys: TOML spelling of every enumerator ----------------------

template <class E>
struct Choices;

template <>
struct Choices<DataSection::Source> {
  static std::vector<std::pair<DataSection::Source, char const *>> const &list() {
    static std::vector<std::pair<DataSection::Source, char const *>> const v{
        {DataSection::Source::fashion_mnist, "fashion-mnist"},
        {DataSection::Source::synthetic, "synthetic"},
        {DataSection::Source::hdf5, "hdf5"}};
    return v;
  }
};
template <>
struct Choices<MoeSection::Dtype> {
  static std::vector<std::pair<MoeSection::Dtype, char const *>> const &list() {
    static std::vector<std::pair<MoeSection::Dtype, char const *>> const v{
        {MoeSection::Dtype::float32, "float32"}, {MoeSection::Dtype::bfloat16, "bfloat16"}};
    return v;
  }
};
template <>
struct Choices<ParallelSection::Mode> {
  static std::vector<std::pair<ParallelSection::Mode, char const *>> const &list() {
    static std::vector<std::pair<ParallelSection::Mode, char const *>> const v{
        {ParallelSection::Mode::automatic, "auto"},
        {ParallelSection::Mode::data, "data"},
        {ParallelSection::Mode::model, "model"}};
    return v;
  }
};
template <>
struct Choices<TrainSection::Schedule> {
  static std::vector<std::pair<TrainSection::Schedule, char const *>> const &list() {
    static std::vector<std::pair<TrainSection::Schedule, char const *>> const v{
        {TrainSection::Schedule::cosine, "cosine"}, {TrainSection::Schedule::constant, "constant"}};
    return v;
  }
};
template <>
struct Choices<OutputSection::Progress> {
  static std::vector<std::pair<OutputSection::Progress, char const *>> const &list() {
    static std::vector<std::pair<OutputSection::Progress, char const *>> const v{
        {OutputSection::Progress::automatic, "auto"},
        {OutputSection::Progress::on, "on"},
        {OutputSection::Progress::off, "off"}};
    return v;
  }
};

template <class E>
char const *choice_name(E e) {
  for (auto const &[value, name] : Choices<E>::list())
    if (value == e) return name;
  return "?";
}

template <class E>
std::string choice_list() {
  std::string s;
  auto const &list = Choices<E>::list();
  for (std::size_t i = 0; i < list.size(); ++i) {
    if (i > 0) s += i + 1 == list.size() ? " or " : ", ";
    s += '"';
    s += list[i].second;
    s += '"';
  }
  return s;
}

// ---- the one list of sections and keys ---------------------------------------

// V has section(name) and key(name, field). D is Deck or Deck const.
template <class D, class V>
void visit_deck(D &d, V &v) {
  v.section("run");
  v.key("name", d.run.name);
  v.key("output_dir", d.run.output_dir);
  v.key("seed", d.run.seed);

  v.section("data");
  v.key("source", d.data.source);
  v.key("path", d.data.path);
  v.key("train_samples", d.data.train_samples);
  v.key("test_samples", d.data.test_samples);
  v.key("synthetic_train", d.data.synthetic_train);
  v.key("synthetic_test", d.data.synthetic_test);
  v.key("image_size", d.data.image_size);
  v.key("channels", d.data.channels);
  v.key("classes", d.data.classes);
  v.key("file", d.data.file);
  v.key("train_images", d.data.train_images);
  v.key("train_labels", d.data.train_labels);
  v.key("test_images", d.data.test_images);
  v.key("test_labels", d.data.test_labels);

  v.section("model");
  v.key("patch_size", d.model.patch_size);
  v.key("dim", d.model.dim);
  v.key("depth", d.model.depth);
  v.key("heads", d.model.heads);
  v.key("mlp_ratio", d.model.mlp_ratio);
  v.key("moe_every", d.model.moe_every);

  v.section("moe");
  v.key("experts", d.moe.experts);
  v.key("top_k", d.moe.top_k);
  v.key("activation", d.moe.activation);
  v.key("renormalize", d.moe.renormalize);
  v.key("aux_loss_weight", d.moe.aux_loss_weight);
  v.key("z_loss_weight", d.moe.z_loss_weight);
  v.key("capacity_factor", d.moe.capacity_factor);
  v.key("dtype", d.moe.dtype);

  v.section("parallel");
  v.key("mode", d.parallel.mode);
  v.key("proportions", d.parallel.proportions);
  v.key("rates", d.parallel.rates);
  v.key("slowdown", d.parallel.slowdown);
  v.key("group_size", d.parallel.group_size);
  v.key("overlap", d.parallel.overlap);

  v.section("train");
  v.key("epochs", d.train.epochs);
  v.key("max_steps", d.train.max_steps);
  v.key("batch_size", d.train.batch_size);
  v.key("lr", d.train.lr);
  v.key("min_lr", d.train.min_lr);
  v.key("schedule", d.train.schedule);
  v.key("weight_decay", d.train.weight_decay);
  v.key("beta1", d.train.beta1);
  v.key("beta2", d.train.beta2);
  v.key("eps", d.train.eps);
  v.key("warmup_steps", d.train.warmup_steps);
  v.key("clip_norm", d.train.clip_norm);
  v.key("log_every", d.train.log_every);
  v.key("eval_every", d.train.eval_every);
  v.key("eval_batch_size", d.train.eval_batch_size);

  v.section("checkpoint");
  v.key("every", d.checkpoint.every);
  v.key("keep", d.checkpoint.keep);
  v.key("dir", d.checkpoint.dir);
  v.key("at_end", d.checkpoint.at_end);
  v.key("resume", d.checkpoint.resume);

  v.section("output");
  v.key("metrics", d.output.metrics);
  v.key("progress", d.output.progress);
  v.key("activations_layers", d.output.activations_layers);
  v.key("activations_steps", d.output.activations_steps);
  v.key("activations_file", d.output.activations_file);
}

// Section names and their keys, in declaration order.
struct Schema {
  std::vector<std::pair<std::string, std::vector<std::string>>> sections;
  void section(char const *s) { sections.push_back({s, {}}); }
  template <class T>
  void key(char const *k, T const &) {
    sections.back().second.push_back(k);
  }
  std::vector<std::string> const *keys_of(std::string const &s) const {
    for (auto const &sec : sections)
      if (sec.first == s) return &sec.second;
    return nullptr;
  }
};

Schema const &schema() {
  static Schema const s = [] {
    Schema sch;
    Deck const d;
    visit_deck(d, sch);
    return sch;
  }();
  return s;
}

// ---- small helpers -------------------------------------------------------------

// Optimal string alignment distance (Levenshtein plus adjacent transpositions).
int edit_distance(std::string const &a, std::string const &b) {
  std::size_t const n = a.size(), m = b.size();
  std::vector<std::vector<int>> d(n + 1, std::vector<int>(m + 1, 0));
  for (std::size_t i = 0; i <= n; ++i) d[i][0] = static_cast<int>(i);
  for (std::size_t j = 0; j <= m; ++j) d[0][j] = static_cast<int>(j);
  for (std::size_t i = 1; i <= n; ++i)
    for (std::size_t j = 1; j <= m; ++j) {
      int const cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  return d[n][m];
}

// "; did you mean 'x'?" for the closest candidate within distance 2, else ".":
// it ends the sentence either way.
std::string suggestion(std::string const &word, std::vector<std::string> const &candidates) {
  int best = 3;
  std::string const *pick = nullptr;
  for (auto const &c : candidates) {
    int const dist = edit_distance(word, c);
    if (dist < best) best = dist, pick = &c;
  }
  return pick ? "; did you mean '" + *pick + "'?" : ".";
}

std::string format_double(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  auto const res = std::to_chars(buf, buf + sizeof buf, x);  // shortest round-trip form
  std::string s(buf, res.ptr);
  auto const e = s.find('e');
  if (e == std::string::npos) {
    if (s.find('.') == std::string::npos) s += ".0";
  } else {
    // "3e-04" -> "3e-4": TOML allows the zeros, people do not write them.
    std::size_t z = e + 1;
    if (z < s.size() && (s[z] == '-' || s[z] == '+')) ++z;
    while (z + 1 < s.size() && s[z] == '0') s.erase(z, 1);
  }
  return s;
}

// A number in a message, as people write it: 0, 0.5, 1e-8.
std::string format_bound(double x) {
  std::string s = format_double(x);
  if (s.size() > 2 && s.compare(s.size() - 2, 2, ".0") == 0) s.resize(s.size() - 2);
  return s;
}
std::string format_bound(int x) { return std::to_string(x); }
std::string format_bound(std::int64_t x) { return std::to_string(x); }

std::string quote(std::string const &s) {
  std::string out = "\"";
  for (char const c : s) {
    auto const u = static_cast<unsigned char>(c);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (u < 0x20 || u == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", u);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string format_value(std::string const &s) { return quote(s); }
std::string format_value(bool b) { return b ? "true" : "false"; }
std::string format_value(int i) { return std::to_string(i); }
std::string format_value(std::int64_t i) { return std::to_string(i); }
std::string format_value(double x) { return format_double(x); }
template <class E, class = std::enable_if_t<std::is_enum_v<E>>>
std::string format_value(E e) {
  return quote(choice_name(e));
}
template <class T>
std::string format_value(std::vector<T> const &v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + format_value(v[i]);
  return s + "]";
}

char const *type_name(toml::node const &n) {
  switch (n.type()) {
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a float";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::date: return "a date";
    case toml::node_type::time: return "a time";
    case toml::node_type::date_time: return "a date-time";
    case toml::node_type::array: return "an array";
    case toml::node_type::table: return "a table";
    default: return "nothing";
  }
}

// The value of a scalar node as written in TOML, for messages; "" otherwise.
std::string shown(toml::node const &n) {
  if (auto const *s = n.as_string()) return " (" + quote(s->get()) + ")";
  if (auto const *i = n.as_integer()) return " (" + std::to_string(i->get()) + ")";
  if (auto const *f = n.as_floating_point()) return " (" + format_double(f->get()) + ")";
  if (auto const *b = n.as_boolean()) return b->get() ? " (true)" : " (false)";
  return "";
}

// ---- reading -------------------------------------------------------------------

class Reader {
 public:
  Reader(toml::table const &root, Deck &deck, std::set<std::string> const &overridden)
      : root_(root), deck_(deck), overridden_(overridden) {}

  void section(char const *s) {
    section_ = s;
    toml::node const *n = root_.get(s);
    table_ = n ? n->as_table() : nullptr;  // non-tables were refused by check_structure
  }

  template <class T>
  void key(char const *k, T &field) {
    if (!table_) return;
    toml::node const *n = table_->get(k);
    if (!n) return;
    std::string const full = section_ + "." + k;
    deck_.origins[full] = overridden_.count(full) ? std::string("--set") : deck_.path + ":" + line_of(*n);
    read(*n, deck_.where(full), full, field);
  }

 private:
  static std::string line_of(toml::node const &n) { return std::to_string(n.source().begin.line); }

  // Location of an array element: its own line when it came from the file.
  std::string element_where(toml::node const &e, std::string const &full, std::size_t i) const {
    std::string const name = full + "[" + std::to_string(i) + "]";
    if (overridden_.count(full)) return "--set " + name;
    return deck_.path + ":" + line_of(e) + ": " + name;
  }

  [[noreturn]] static void type_error(std::string const &where, char const *expected, toml::node const &n) {
    throw InputError(where, std::string("expected ") + expected + ", got " + type_name(n) + shown(n) + ".");
  }

  void read(toml::node const &n, std::string const &where, std::string const &, std::string &field) {
    if (!n.is_string()) type_error(where, "a string", n);
    field = n.as_string()->get();
  }
  void read(toml::node const &n, std::string const &where, std::string const &, bool &field) {
    if (!n.is_boolean()) type_error(where, "a boolean (true or false)", n);
    field = n.as_boolean()->get();
  }
  void read(toml::node const &n, std::string const &where, std::string const &, std::int64_t &field) {
    if (!n.is_integer()) type_error(where, "an integer", n);
    field = n.as_integer()->get();
  }
  void read(toml::node const &n, std::string const &where, std::string const &full, int &field) {
    std::int64_t v = 0;
    read(n, where, full, v);
    if (v < INT_MIN || v > INT_MAX)
      throw InputError(where, "the value " + std::to_string(v) + " does not fit a 32-bit integer (" +
                                  std::to_string(INT_MIN) + " to " + std::to_string(INT_MAX) + ").");
    field = static_cast<int>(v);
  }
  void read(toml::node const &n, std::string const &where, std::string const &, double &field) {
    // An integer is a fine float ("mlp_ratio = 4").
    if (auto const *i = n.as_integer())
      field = static_cast<double>(i->get());
    else if (auto const *f = n.as_floating_point())
      field = f->get();
    else
      type_error(where, "a number", n);
    if (!std::isfinite(field)) throw InputError(where, "expected a finite number, got " + format_double(field) + ".");
  }
  template <class E, class = std::enable_if_t<std::is_enum_v<E>>>
  void read(toml::node const &n, std::string const &where, std::string const &, E &field) {
    if (!n.is_string()) type_error(where, ("one of " + choice_list<E>()).c_str(), n);
    std::string const &s = n.as_string()->get();
    std::vector<std::string> names;
    for (auto const &[value, name] : Choices<E>::list()) {
      if (s == name) {
        field = value;
        return;
      }
      names.push_back(name);
    }
    throw InputError(where, "expected one of " + choice_list<E>() + ", got " + quote(s) + suggestion(s, names));
  }
  template <class T>
  void read(toml::node const &n, std::string const &where, std::string const &full, std::vector<T> &field) {
    toml::array const *a = n.as_array();
    if (!a) type_error(where, "an array", n);
    std::vector<T> out(a->size());
    for (std::size_t i = 0; i < a->size(); ++i) read((*a)[i], element_where((*a)[i], full, i), full, out[i]);
    field = std::move(out);
  }

  toml::table const &root_;
  Deck &deck_;
  std::set<std::string> const &overridden_;
  std::string section_;
  toml::table const *table_ = nullptr;
};

// Where a node of the TOML tree was set: its line, or the override that made it.
std::string node_where(toml::node const &n, std::string const &path, std::string const &name,
                       std::set<std::string> const &overridden) {
  for (auto const &k : overridden)
    if (k == name || k.rfind(name + ".", 0) == 0) {
      if (n.source().begin.line == 0 || k == name) return "--set " + k;
    }
  return path + ":" + std::to_string(n.source().begin.line) + ": " + name;
}

// Unknown sections, unknown keys, sections that are not tables. Reports the
// problem on the earliest line.
void check_structure(toml::table const &root, std::string const &path, std::set<std::string> const &overridden) {
  Schema const &sch = schema();
  std::vector<std::string> section_names;
  for (auto const &s : sch.sections) section_names.push_back(s.first);

  struct Problem {
    std::uint32_t line;
    std::string where, what;
  };
  std::vector<Problem> problems;
  auto add = [&](toml::node const &n, std::string const &name, std::string what) {
    std::uint32_t line = n.source().begin.line;
    if (line == 0) line = 0xffffffffu;  // overrides after the file's own problems
    problems.push_back({line, node_where(n, path, name, overridden), std::move(what)});
  };

  for (auto const &[k, node] : root) {
    std::string const name(k.str());
    std::vector<std::string> const *keys = sch.keys_of(name);
    if (!keys) {
      if (node.is_table()) {
        add(node, name, "unknown section [" + name + "]" + suggestion(name, section_names));
      } else {
        // A key before any [section]: say where it belongs, if anywhere.
        std::string home;
        for (auto const &s : sch.sections)
          if (std::find(s.second.begin(), s.second.end(), name) != s.second.end()) home = s.first;
        add(node, name,
            "key '" + name + "' is outside any section" +
                (home.empty() ? std::string(" and is not a known key.") : "; it belongs in [" + home + "]."));
      }
      continue;
    }
    toml::table const *t = node.as_table();
    if (!t) {
      add(node, name, "[" + name + "] must be a table, got " + std::string(type_name(node)) + ".");
      continue;
    }
    for (auto const &[kk, sub] : *t) {
      std::string const key(kk.str());
      if (std::find(keys->begin(), keys->end(), key) != keys->end()) continue;
      std::string hint = suggestion(key, *keys);
      if (hint == ".")
        for (auto const &s : sch.sections)
          if (std::find(s.second.begin(), s.second.end(), key) != s.second.end()) hint = "; it belongs in [" + s.first + "].";
      add(sub, name + "." + key, "unknown key '" + key + "' in [" + name + "]" + hint);
    }
  }
  if (problems.empty()) return;
  auto const first = std::min_element(problems.begin(), problems.end(),
                                      [](Problem const &a, Problem const &b) { return a.line < b.line; });
  throw InputError(first->where, first->what);
}

std::string trim(std::string const &s) {
  auto const b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  auto const e = s.find_last_not_of(" \t");
  return s.substr(b, e - b + 1);
}

// Applies "section.key=value" to the tree; returns the keys it set.
std::set<std::string> apply_overrides(toml::table &root, std::vector<std::string> const &overrides) {
  std::set<std::string> done;
  for (auto const &ov : overrides) {
    auto const eq = ov.find('=');
    if (eq == std::string::npos)
      throw InputError("--set " + ov, "an override must have the form section.key=value.");
    std::string const key = trim(ov.substr(0, eq));
    std::string const value = trim(ov.substr(eq + 1));
    auto const dot = key.find('.');
    if (dot == std::string::npos || dot == 0 || dot + 1 == key.size() || key.find('.', dot + 1) != std::string::npos)
      throw InputError("--set " + key, "an override key must have the form section.key.");
    if (value.empty()) throw InputError("--set " + key, "the override has no value after '='.");
    if (value.find_first_of("\r\n") != std::string::npos)
      throw InputError("--set " + key, "an override value must be on one line.");

    toml::table parsed;
    try {
      parsed = toml::parse("v = " + value);
    } catch (toml::parse_error const &e) {
      // A bare word ("--set data.source=synthetic") is a string; anything
      // that looks like TOML but is broken is an error.
      if (std::string("[{\"'").find(value[0]) != std::string::npos)
        throw InputError("--set " + key, "cannot parse '" + value + "' as a TOML value: " + std::string(e.description()) + ".");
      parsed = toml::table{};
      parsed.insert("v", value);
    }

    std::string const sec = key.substr(0, dot);
    std::string const k = key.substr(dot + 1);
    toml::node *s = root.get(sec);
    if (!s) s = &root.insert(sec, toml::table{}).first->second;
    toml::table *t = s->as_table();
    if (!t) throw InputError("--set " + key, "[" + sec + "] is not a table in the deck.");
    parsed.get("v")->visit([&](auto const &v) { t->insert_or_assign(k, v); });
    done.insert(key);
  }
  return done;
}

// ---- validation ----------------------------------------------------------------

class Validator {
 public:
  explicit Validator(Deck &d) : d_(d) {}

  void run() {
    run_section();
    data_section();
    model_section();
    moe_section();
    parallel_section();
    train_section();
    checkpoint_section();
    output_section();
  }

 private:
  [[noreturn]] void fail(std::string const &key, std::string const &what) const { throw InputError(d_.where(key), what); }

  // Cross-key problems are reported at the first of the keys that the deck sets.
  [[noreturn]] void fail_any(std::vector<std::string> const &keys, std::string const &what) const {
    for (auto const &k : keys)
      if (d_.origins.count(k)) fail(k, what);
    fail(keys.front(), what);
  }

  template <class T>
  void at_least(std::string const &key, T value, T min) const {
    if (value < min) fail(key, key + " must be >= " + format_bound(min) + ", got " + format_value(value) + ".");
  }
  void positive(std::string const &key, double value) const {
    if (!(value > 0)) fail(key, key + " must be > 0, got " + format_double(value) + ".");
  }
  void unit_interval(std::string const &key, double value) const {
    if (!(value >= 0 && value < 1)) fail(key, key + " must be in [0, 1), got " + format_double(value) + ".");
  }
  void not_empty(std::string const &key, std::string const &value) const {
    if (value.empty()) fail(key, key + " must not be empty.");
  }

  void run_section() {
    not_empty("run.name", d_.run.name);
    if (!d_.origins.count("run.output_dir")) d_.run.output_dir = "out/" + d_.run.name;
    not_empty("run.output_dir", d_.run.output_dir);
    at_least<std::int64_t>("run.seed", d_.run.seed, 0);
  }

  void data_section() {
    auto const &data = d_.data;
    at_least("data.train_samples", data.train_samples, 0);
    at_least("data.test_samples", data.test_samples, 0);
    at_least("data.synthetic_train", data.synthetic_train, 1);
    at_least("data.synthetic_test", data.synthetic_test, 0);
    at_least("data.image_size", data.image_size, 1);
    at_least("data.channels", data.channels, 1);
    at_least("data.classes", data.classes, 2);

    std::error_code ec;
    switch (data.source) {
      case DataSection::Source::fashion_mnist: {
        // Fashion-MNIST is 60000 + 10000 28x28 grey images of 10 classes.
        if (data.image_size != 28 || data.channels != 1 || data.classes != 10)
          fail_any({"data.image_size", "data.channels", "data.classes", "data.source"},
                   "data.source = \"fashion-mnist\" has 28x28 images, 1 channel and 10 classes, but the deck sets "
                   "data.image_size = " + std::to_string(data.image_size) + ", data.channels = " +
                       std::to_string(data.channels) + ", data.classes = " + std::to_string(data.classes) + ".");
        if (data.train_samples > 60000)
          fail("data.train_samples", "data.train_samples = " + std::to_string(data.train_samples) +
                                         " exceeds the 60000 training images of Fashion-MNIST.");
        if (data.test_samples > 10000)
          fail("data.test_samples", "data.test_samples = " + std::to_string(data.test_samples) +
                                        " exceeds the 10000 test images of Fashion-MNIST.");
        if (!fs::is_directory(data.path, ec))
          fail_any({"data.path", "data.source"},
                   "data.path " + quote(data.path) + " is not a directory (data.source = \"fashion-mnist\" needs the "
                   "directory with the four IDX files).");
        for (char const *f : {"train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                              "t10k-labels-idx1-ubyte"}) {
          fs::path const p = fs::path(data.path) / f;
          if (!fs::is_regular_file(p.string() + ".gz", ec) && !fs::is_regular_file(p, ec))
            fail_any({"data.path", "data.source"},
                     "data.path " + quote(data.path) + " has no " + f + ".gz (nor " + f + ").");
        }
        break;
      }
      case DataSection::Source::hdf5:
        if (data.file.empty())
          fail_any({"data.source", "data.file"}, "data.source = \"hdf5\" needs data.file, the HDF5 file with the data sets.");
        if (!fs::is_regular_file(data.file, ec)) fail("data.file", "data.file " + quote(data.file) + " does not exist.");
        not_empty("data.train_images", data.train_images);
        not_empty("data.train_labels", data.train_labels);
        not_empty("data.test_images", data.test_images);
        not_empty("data.test_labels", data.test_labels);
        break;
      case DataSection::Source::synthetic: break;
    }
  }

  void model_section() {
    auto const &m = d_.model;
    auto &dv = d_.derived;
    at_least("model.patch_size", m.patch_size, 1);
    at_least("model.dim", m.dim, 1);
    at_least("model.depth", m.depth, 1);
    at_least("model.heads", m.heads, 1);
    positive("model.mlp_ratio", m.mlp_ratio);
    at_least("model.moe_every", m.moe_every, 0);

    if (d_.data.image_size % m.patch_size != 0)
      fail_any({"model.patch_size", "data.image_size"},
               "data.image_size = " + std::to_string(d_.data.image_size) + " is not divisible by model.patch_size = " +
                   std::to_string(m.patch_size) + ".");
    if (m.dim % m.heads != 0)
      fail_any({"model.heads", "model.dim"}, "model.dim = " + std::to_string(m.dim) +
                                                 " is not divisible by model.heads = " + std::to_string(m.heads) + ".");
    double const hidden = std::round(m.dim * m.mlp_ratio);
    if (hidden < 1 || hidden > INT_MAX)
      fail_any({"model.mlp_ratio", "model.dim"}, "the FFN hidden width round(model.dim * model.mlp_ratio) = " +
                                                     format_bound(hidden) + " is out of range (1 to " +
                                                     std::to_string(INT_MAX) + ").");
    if (m.moe_every > m.depth)
      fail_any({"model.moe_every", "model.depth"},
               "model.moe_every = " + std::to_string(m.moe_every) + " exceeds model.depth = " +
                   std::to_string(m.depth) + ", so no block would be MoE; set model.moe_every = 0 for a dense model.");
    std::int64_t const side = d_.data.image_size / m.patch_size;
    std::int64_t const patch_dim = std::int64_t(d_.data.channels) * m.patch_size * m.patch_size;
    if (side * side > INT_MAX || patch_dim > INT_MAX)
      fail_any({"model.patch_size", "data.image_size"}, "the image is too large for 32-bit patch counts.");

    dv.hidden = static_cast<int>(hidden);
    dv.head_dim = m.dim / m.heads;
    dv.patches_per_side = static_cast<int>(side);
    dv.num_patches = static_cast<int>(side * side);
    dv.patch_dim = static_cast<int>(patch_dim);
    dv.moe_blocks.clear();
    if (m.moe_every > 0)
      for (int i = 0; i < m.depth; ++i)
        if ((i + 1) % m.moe_every == 0) dv.moe_blocks.push_back(i);
  }

  void moe_section() {
    auto const &moe = d_.moe;
    at_least("moe.experts", moe.experts, 1);
    at_least("moe.top_k", moe.top_k, 1);
    if (moe.top_k > moe.experts)
      fail_any({"moe.top_k", "moe.experts"}, "moe.top_k = " + std::to_string(moe.top_k) +
                                                 " exceeds moe.experts = " + std::to_string(moe.experts) +
                                                 "; each token picks top_k distinct experts.");
    std::vector<std::string> const acts{"gelu", "relu", "silu"};
    if (std::find(acts.begin(), acts.end(), moe.activation) == acts.end())
      fail("moe.activation", "expected one of \"gelu\", \"relu\" or \"silu\", got " + quote(moe.activation) +
                                 suggestion(moe.activation, acts));
    at_least("moe.aux_loss_weight", moe.aux_loss_weight, 0.0);
    at_least("moe.z_loss_weight", moe.z_loss_weight, 0.0);
    at_least("moe.capacity_factor", moe.capacity_factor, 0.0);
  }

  void parallel_section() {
    auto const &p = d_.parallel;
    if (!p.proportions.empty() && !p.rates.empty())
      fail_any({"parallel.rates", "parallel.proportions"},
               "parallel.proportions and parallel.rates are both given; set only one of them (proportions are "
               "derived from rates).");
    double sum = 0;
    for (std::size_t i = 0; i < p.proportions.size(); ++i) {
      if (p.proportions[i] < 0)
        fail("parallel.proportions", "parallel.proportions[" + std::to_string(i) + "] = " +
                                         format_double(p.proportions[i]) + " must be >= 0.");
      sum += p.proportions[i];
    }
    if (!p.proportions.empty() && std::abs(sum - 1.0) > 1e-6)
      fail("parallel.proportions", "parallel.proportions must sum to 1, got " + format_double(sum) + ".");
    for (std::size_t i = 0; i < p.rates.size(); ++i)
      if (!(p.rates[i] > 0))
        fail("parallel.rates",
             "parallel.rates[" + std::to_string(i) + "] = " + format_double(p.rates[i]) + " must be > 0.");
    for (std::size_t i = 0; i < p.slowdown.size(); ++i)
      if (!(p.slowdown[i] >= 1))
        fail("parallel.slowdown",
             "parallel.slowdown[" + std::to_string(i) + "] = " + format_double(p.slowdown[i]) + " must be >= 1.");
    at_least("parallel.group_size", p.group_size, 0);
  }

  void train_section() {
    auto const &t = d_.train;
    at_least("train.epochs", t.epochs, 0);
    at_least("train.max_steps", t.max_steps, 0);
    at_least("train.batch_size", t.batch_size, 1);
    positive("train.lr", t.lr);
    at_least("train.min_lr", t.min_lr, 0.0);
    if (t.min_lr > t.lr)
      fail_any({"train.min_lr", "train.lr"}, "train.min_lr = " + format_double(t.min_lr) + " exceeds train.lr = " +
                                                 format_double(t.lr) + ".");
    at_least("train.weight_decay", t.weight_decay, 0.0);
    unit_interval("train.beta1", t.beta1);
    unit_interval("train.beta2", t.beta2);
    positive("train.eps", t.eps);
    at_least("train.warmup_steps", t.warmup_steps, 0);
    at_least("train.clip_norm", t.clip_norm, 0.0);
    at_least("train.log_every", t.log_every, 0);
    at_least("train.eval_every", t.eval_every, 0);
    at_least("train.eval_batch_size", t.eval_batch_size, 1);
  }

  void checkpoint_section() {
    auto const &c = d_.checkpoint;
    at_least("checkpoint.every", c.every, 0);
    at_least("checkpoint.keep", c.keep, 1);
    not_empty("checkpoint.dir", c.dir);
    std::error_code ec;
    if (!c.resume.empty() && !fs::exists(c.resume, ec))
      fail("checkpoint.resume", "checkpoint.resume " + quote(c.resume) + " does not exist.");
    d_.derived.checkpoint_dir = (fs::path(d_.run.output_dir) / c.dir).string();
  }

  void output_section() {
    auto const &o = d_.output;
    auto const &blocks = d_.derived.moe_blocks;
    for (std::size_t i = 0; i < o.activations_layers.size(); ++i)
      if (std::find(blocks.begin(), blocks.end(), o.activations_layers[i]) == blocks.end())
        fail("output.activations_layers",
             "output.activations_layers[" + std::to_string(i) + "] = " + std::to_string(o.activations_layers[i]) +
                 " is not an MoE block; the MoE blocks are " + format_value(blocks) + " (model.depth = " +
                 std::to_string(d_.model.depth) + ", model.moe_every = " + std::to_string(d_.model.moe_every) + ").");
    for (std::size_t i = 0; i < o.activations_steps.size(); ++i)
      if (o.activations_steps[i] < 0)
        fail("output.activations_steps", "output.activations_steps[" + std::to_string(i) + "] = " +
                                             std::to_string(o.activations_steps[i]) + " must be >= 0.");
    if (o.activations_layers.empty() != o.activations_steps.empty())
      fail_any({"output.activations_layers", "output.activations_steps"},
               "output.activations_layers and output.activations_steps must be given together (one is empty, so "
               "nothing would be recorded).");
    not_empty("output.activations_file", o.activations_file);
    d_.derived.activations_path = (fs::path(d_.run.output_dir) / o.activations_file).string();
  }

  Deck &d_;
};

// ---- printing ------------------------------------------------------------------

class Writer {
 public:
  explicit Writer(std::ostringstream &os) : os_(os) {}
  void section(char const *s) { os_ << "\n[" << s << "]\n"; }
  template <class T>
  void key(char const *k, T const &field) {
    os_ << k << " = " << format_value(field) << '\n';
  }

 private:
  std::ostringstream &os_;
};

}  // namespace

// ---- public functions ------------------------------------------------------------

char const *to_string(DataSection::Source s) { return choice_name(s); }
char const *to_string(MoeSection::Dtype d) { return choice_name(d); }
char const *to_string(ParallelSection::Mode m) { return choice_name(m); }
char const *to_string(TrainSection::Schedule s) { return choice_name(s); }
char const *to_string(OutputSection::Progress p) { return choice_name(p); }

std::string Deck::where(std::string const &key) const {
  auto const it = origins.find(key);
  if (it == origins.end()) return path + ": " + key;
  if (it->second == "--set") return "--set " + key;
  return it->second + ": " + key;
}

Deck parse_deck(std::string const &toml_text, std::string const &name, std::vector<std::string> const &overrides) {
  toml::table root;
  try {
    root = toml::parse(toml_text, name);
  } catch (toml::parse_error const &e) {
    std::string what(e.description());
    if (!what.empty() && what.back() != '.') what += '.';
    throw InputError(name + ":" + std::to_string(e.source().begin.line), "invalid TOML: " + what);
  }
  std::set<std::string> const overridden = apply_overrides(root, overrides);
  check_structure(root, name, overridden);

  Deck deck;
  deck.path = name;
  Reader reader(root, deck, overridden);
  visit_deck(deck, reader);
  Validator(deck).run();
  return deck;
}

Deck load_deck(std::string const &path, std::vector<std::string> const &overrides) {
  std::ifstream in(path, std::ios::binary);
  std::error_code ec;
  if (!in || fs::is_directory(path, ec)) throw InputError(path, "cannot open the deck file.");
  std::ostringstream text;
  text << in.rdbuf();
  return parse_deck(text.str(), path, overrides);
}

std::string resolved_toml(Deck const &deck) {
  std::ostringstream os;
  // Names and paths are quoted so that no character in them can end a comment line.
  os << "# hexamoe resolved deck" << (deck.path.empty() ? "" : " (from " + quote(deck.path) + ")")
     << ": every key, defaults filled in.\n";
  Writer w(os);
  visit_deck(deck, w);
  auto const &dv = deck.derived;
  os << "\n# Derived values (computed, not read back):\n"
     << "#   model hidden width  = " << dv.hidden << "  # round(dim * mlp_ratio)\n"
     << "#   head dim            = " << dv.head_dim << "  # dim / heads\n"
     << "#   patches per side    = " << dv.patches_per_side << "  # image_size / patch_size\n"
     << "#   tokens per image    = " << dv.num_patches << '\n'
     << "#   patch features      = " << dv.patch_dim << "  # channels * patch_size^2\n"
     << "#   MoE blocks          = " << format_value(dv.moe_blocks) << '\n'
     << "#   checkpoint dir      = " << quote(dv.checkpoint_dir) << '\n'
     << "#   activations file    = " << quote(dv.activations_path) << '\n';
  return os.str();
}

void check_parallel(Deck const &deck, int nranks) {
  if (nranks < 1) throw InputError("check_parallel", "the rank count must be >= 1, got " + std::to_string(nranks) + ".");
  auto const &p = deck.parallel;
  auto per_rank = [&](char const *key, std::size_t n) {
    if (n != 0 && n != static_cast<std::size_t>(nranks))
      throw InputError(deck.where(key), std::string(key) + " has " + std::to_string(n) + " entries but the job has " +
                                            std::to_string(nranks) + " ranks; give one entry per rank.");
  };
  per_rank("parallel.proportions", p.proportions.size());
  per_rank("parallel.rates", p.rates.size());
  per_rank("parallel.slowdown", p.slowdown.size());
  if (p.group_size > 0 && nranks % p.group_size != 0)
    throw InputError(deck.where("parallel.group_size"), "parallel.group_size = " + std::to_string(p.group_size) +
                                                            " does not divide the " + std::to_string(nranks) +
                                                            " ranks of the job.");
}

bool operator==(Deck const &a, Deck const &b) {
  // Keep in step with the structs in Deck.hpp (the round-trip test would miss a field left out here).
  auto run = [](RunSection const &s) { return std::tie(s.name, s.output_dir, s.seed); };
  auto data = [](DataSection const &s) {
    return std::tie(s.source, s.path, s.train_samples, s.test_samples, s.synthetic_train, s.synthetic_test,
                    s.image_size, s.channels, s.classes, s.file, s.train_images, s.train_labels, s.test_images,
                    s.test_labels);
  };
  auto model = [](ModelSection const &s) {
    return std::tie(s.patch_size, s.dim, s.depth, s.heads, s.mlp_ratio, s.moe_every);
  };
  auto moe = [](MoeSection const &s) {
    return std::tie(s.experts, s.top_k, s.activation, s.renormalize, s.aux_loss_weight, s.z_loss_weight,
                    s.capacity_factor, s.dtype);
  };
  auto parallel = [](ParallelSection const &s) {
    return std::tie(s.mode, s.proportions, s.rates, s.slowdown, s.group_size, s.overlap);
  };
  auto train = [](TrainSection const &s) {
    return std::tie(s.epochs, s.max_steps, s.batch_size, s.lr, s.min_lr, s.schedule, s.weight_decay, s.beta1,
                    s.beta2, s.eps, s.warmup_steps, s.clip_norm, s.log_every, s.eval_every, s.eval_batch_size);
  };
  auto checkpoint = [](CheckpointSection const &s) { return std::tie(s.every, s.keep, s.dir, s.at_end, s.resume); };
  auto output = [](OutputSection const &s) {
    return std::tie(s.metrics, s.progress, s.activations_layers, s.activations_steps, s.activations_file);
  };
  auto derived = [](DerivedValues const &s) {
    return std::tie(s.hidden, s.head_dim, s.patches_per_side, s.num_patches, s.patch_dim, s.moe_blocks,
                    s.checkpoint_dir, s.activations_path);
  };
  return run(a.run) == run(b.run) && data(a.data) == data(b.data) && model(a.model) == model(b.model) &&
         moe(a.moe) == moe(b.moe) && parallel(a.parallel) == parallel(b.parallel) &&
         train(a.train) == train(b.train) && checkpoint(a.checkpoint) == checkpoint(b.checkpoint) &&
         output(a.output) == output(b.output) && derived(a.derived) == derived(b.derived);
}

}  // namespace hexamoe
