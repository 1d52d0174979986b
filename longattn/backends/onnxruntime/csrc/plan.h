// The node's `plan` attribute: the policy's length bands as JSON (see longattn/kernels/dispatch.py):
//   [{"below": 4096 | null, "kind": "flash", "params": {"block_size": 256, ...}}, ...]
// A tiny reader for exactly that shape of JSON (numbers, strings, booleans, null, objects, lists).
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace longattn {

struct Band {
  std::string kind = "flash";
  int64_t below = -1;  // exclusive bound on the key length; -1 = unbounded
  std::map<std::string, double> numbers;
  std::map<std::string, std::string> strings;

  double number(const std::string& key, double fallback) const {
    auto it = numbers.find(key);
    return it == numbers.end() ? fallback : it->second;
  }
  std::string string(const std::string& key, const std::string& fallback) const {
    auto it = strings.find(key);
    return it == strings.end() ? fallback : it->second;
  }
};

class PlanReader {
 public:
  explicit PlanReader(const std::string& text) : s_(text) {}

  std::vector<Band> read() {
    std::vector<Band> bands;
    expect('[');
    if (peek() == ']') { ++i_; return bands; }
    while (true) {
      bands.push_back(read_band());
      if (peek() == ',') { ++i_; continue; }
      expect(']');
      return bands;
    }
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error("longattn: malformed plan attribute at offset " + std::to_string(i_) + ": " + what);
  }
  char peek() {
    while (i_ < s_.size() && isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
    if (i_ >= s_.size()) fail("unexpected end");
    return s_[i_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  std::string read_string() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      if (s_[i_] == '\\' && i_ + 1 < s_.size()) ++i_;
      out += s_[i_++];
    }
    if (i_ >= s_.size()) fail("unterminated string");
    ++i_;
    return out;
  }
  // returns true and sets number, or false and sets text (strings, true/false, null -> "null")
  bool read_scalar(double& number, std::string& text) {
    char c = peek();
    if (c == '"') { text = read_string(); return false; }
    for (const char* word : {"true", "false", "null"}) {
      size_t n = strlen(word);
      if (s_.compare(i_, n, word) == 0) {
        i_ += n;
        if (word[0] == 'n') { text = "null"; return false; }
        number = word[0] == 't' ? 1.0 : 0.0;
        return true;
      }
    }
    size_t used = 0;
    try { number = std::stod(s_.substr(i_, 32), &used); } catch (...) { fail("expected a value"); }
    i_ += used;
    return true;
  }
  Band read_band() {
    Band band;
    expect('{');
    while (true) {
      std::string key = read_string();
      expect(':');
      if (key == "params") {
        expect('{');
        if (peek() == '}') { ++i_; }
        else while (true) {
          std::string name = read_string();
          expect(':');
          double number; std::string text;
          if (read_scalar(number, text)) band.numbers[name] = number; else band.strings[name] = text;
          if (peek() == ',') { ++i_; continue; }
          expect('}');
          break;
        }
      } else {
        double number; std::string text;
        bool is_number = read_scalar(number, text);
        if (key == "kind") band.kind = text;
        else if (key == "below") band.below = is_number ? static_cast<int64_t>(number) : -1;
      }
      if (peek() == ',') { ++i_; continue; }
      expect('}');
      return band;
    }
  }
};

inline const Band& band_for_length(const std::vector<Band>& bands, int64_t key_length) {
  for (const Band& b : bands)
    if (b.below < 0 || key_length < b.below) return b;
  return bands.back();
}

}  // namespace longattn
