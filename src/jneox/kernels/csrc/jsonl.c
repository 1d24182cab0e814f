/* JSONL lines to the UTF-8 bytes the tokenizer encodes, in one pass (jneox_jsonl_texts, see jneox.h).
 *
 * It stands for, line by line, Python's json.loads(line)[field] followed by the tokenizer's newline
 * rewrite (jneox.tokenizer.Tokenizer._with_nl: "\r\n" and "\n" become "<NL>"), and it only ever accepts
 * a chunk where that reading is certain: every line one JSON object (RFC 8259 grammar: no NaN, no BOM)
 * with the field once, as a string, written without escapes in its key; every string valid UTF-8 without
 * raw control characters, every \u escape a character or a surrogate pair; numbers at most
 * JSONL_MAX_NUMBER characters (Python's int() refuses very long ones); nesting at most JSONL_MAX_DEPTH.
 * Anything else, blank lines included, makes it return -1 and the caller reads the chunk in Python,
 * which names the bad line. Every read is checked against the end of the data. */

#define JSONL_MAX_DEPTH 64
#define JSONL_MAX_NUMBER 256
#define JSONL_NL "<NL>"

/* the length of the UTF-8 sequence at p whose first byte is >= 0x80, or 0 if it is not one that
 * Python's strict UTF-8 decoder accepts (no overlong forms, no surrogates, at most U+10FFFF) */
static inline int jsonl_utf8(const uint8_t *p, const uint8_t *end) {
    const uint8_t c = p[0];
    const long left = end - p;
    if (c >= 0xC2 && c <= 0xDF)
        return left >= 2 && (p[1] & 0xC0) == 0x80 ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        if (left < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
        if ((c == 0xE0 && p[1] < 0xA0) || (c == 0xED && p[1] >= 0xA0)) return 0;
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (left < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return 0;
        if ((c == 0xF0 && p[1] < 0x90) || (c == 0xF4 && p[1] >= 0x90)) return 0;
        return 4;
    }
    return 0;
}

static inline const uint8_t *jsonl_ws(const uint8_t *p, const uint8_t *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\r')) p++; /* '\n' ends the line */
    return p;
}

static inline int jsonl_hex4(const uint8_t *p, const uint8_t *end) {
    if (end - p < 4) return -1;
    int v = 0;
    for (int i = 0; i < 4; i++) {
        const uint8_t c = p[i];
        int d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return -1;
        v = v * 16 + d;
    }
    return v;
}

/* The string whose opening quote is at p[-1]: returns the byte after its closing quote, or NULL.
 * With out (write 1), its characters are appended at *out (below oend), newlines as JSONL_NL (nl 1) or
 * refused (nl 0: the caller separates texts with '\n'); a "\r" right before a newline goes with it. */
static inline const uint8_t *jsonl_string(const uint8_t *p, const uint8_t *end, const int write, uint8_t **out,
                                          const uint8_t *oend, const int nl) {
    uint8_t *o = write ? *out : NULL, *const start = o;
    const uint8_t *run = p; /* bytes run..p are plain and valid: copied at once */
    for (;;) {
        /* runs of three-byte characters (most CJK text) a word at a time: the lead byte 1110xxxx, two
         * continuation bytes, and the top ten bits of the code point past the overlong forms (< 0x20)
         * and not a surrogate (0x360..0x37F); anything else goes the general way below */
        while (end - p >= 8) { /* two at a time */
            uint64_t w;
            memcpy(&w, p, 8);
            const uint32_t top0 = (uint32_t)(((w & 0x0F) << 6) | ((w >> 8) & 0x3F));
            const uint32_t top1 = (uint32_t)((((w >> 24) & 0x0F) << 6) | ((w >> 32) & 0x3F));
            if ((w & 0xC0C0F0C0C0F0ull) != 0x8080E08080E0ull || top0 < 0x20 || (top0 & 0x3E0) == 0x360 ||
                top1 < 0x20 || (top1 & 0x3E0) == 0x360)
                break;
            p += 6;
        }
        while (end - p >= 4) {
            uint32_t w;
            memcpy(&w, p, 4);
            const uint32_t top = ((w & 0x0F) << 6) | ((w >> 8) & 0x3F);
            if ((w & 0xC0C0F0) != 0x8080E0 || top < 0x20 || (top & 0x3E0) == 0x360) break;
            p += 3;
        }
        /* and ASCII other than '"', '\\' and control characters, eight bytes at a time */
        while (end - p >= 8) {
            uint64_t w;
            memcpy(&w, p, 8);
            const uint64_t ones = 0x0101010101010101ull, high = 0x8080808080808080ull;
            const uint64_t quote = w ^ (ones * '"'), slash = w ^ (ones * '\\');
            /* a byte of (x - 1) & ~x & 0x80 is set where a byte of x is 0 (exactly, for the lowest one) */
            const uint64_t stop = (w | ((w - ones * 0x20) & ~w) | ((quote - ones) & ~quote) | ((slash - ones) & ~slash)) & high;
            if (stop) break;
            p += 8;
        }
        if (p >= end) return NULL;
        const uint8_t c = *p;
        if (c >= 0x80) {
            const int k = jsonl_utf8(p, end);
            if (!k) return NULL;
            p += k;
            continue;
        }
        if (c != '"' && c != '\\' && c >= 0x20) {
            p++;
            continue;
        }
        if (c < 0x20) return NULL; /* raw control characters: json.loads (strict) refuses them */
        if (write) {
            if (oend - o < p - run) return NULL;
            memcpy(o, run, (size_t)(p - run));
            o += p - run;
        }
        if (c == '"') {
            if (write) *out = o;
            return p + 1;
        }
        /* an escape */
        if (end - p < 2) return NULL;
        uint32_t cp;
        switch (p[1]) {
        case '"': cp = '"'; break;
        case '\\': cp = '\\'; break;
        case '/': cp = '/'; break;
        case 'b': cp = '\b'; break;
        case 'f': cp = '\f'; break;
        case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;
        case 't': cp = '\t'; break;
        case 'u': {
            const int v = jsonl_hex4(p + 2, end);
            if (v < 0 || (v >= 0xDC00 && v <= 0xDFFF)) return NULL; /* a lone low surrogate */
            cp = (uint32_t)v;
            if (v >= 0xD800 && v <= 0xDBFF) { /* must be followed by its low surrogate */
                if (end - p < 12 || p[6] != '\\' || p[7] != 'u') return NULL;
                const int lo = jsonl_hex4(p + 8, end);
                if (lo < 0xDC00 || lo > 0xDFFF) return NULL;
                cp = 0x10000 + (((uint32_t)v - 0xD800) << 10) + ((uint32_t)lo - 0xDC00);
                p += 6;
            }
            p += 4;
            break;
        }
        default: return NULL;
        }
        p += 2;
        run = p;
        if (!write) continue;
        if (oend - o < 4) return NULL;
        if (cp == '\n') {
            if (!nl) return NULL;
            if (o > start && o[-1] == '\r') o--; /* "\r\n" is one newline; 0x0D in the output is only ever a "\r" */
            memcpy(o, JSONL_NL, 4);
            o += 4;
        } else if (cp < 0x80) {
            *o++ = (uint8_t)cp;
        } else if (cp < 0x800) {
            *o++ = (uint8_t)(0xC0 | (cp >> 6));
            *o++ = (uint8_t)(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            *o++ = (uint8_t)(0xE0 | (cp >> 12));
            *o++ = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
            *o++ = (uint8_t)(0x80 | (cp & 0x3F));
        } else {
            *o++ = (uint8_t)(0xF0 | (cp >> 18));
            *o++ = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
            *o++ = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
            *o++ = (uint8_t)(0x80 | (cp & 0x3F));
        }
    }
}

static inline int jsonl_digit(const uint8_t *p, const uint8_t *end) { return p < end && *p >= '0' && *p <= '9'; }

static const uint8_t *jsonl_number(const uint8_t *p, const uint8_t *end) {
    const uint8_t *s = p;
    if (p < end && *p == '-') p++;
    if (p < end && *p == '0') p++;
    else if (jsonl_digit(p, end)) while (jsonl_digit(p, end)) p++;
    else return NULL;
    if (p < end && *p == '.') {
        p++;
        if (!jsonl_digit(p, end)) return NULL;
        while (jsonl_digit(p, end)) p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (!jsonl_digit(p, end)) return NULL;
        while (jsonl_digit(p, end)) p++;
    }
    return p - s <= JSONL_MAX_NUMBER ? p : NULL;
}

static const uint8_t *jsonl_literal(const uint8_t *p, const uint8_t *end, const char *word, long n) {
    return end - p >= n && memcmp(p, word, (size_t)n) == 0 ? p + n : NULL;
}

/* one JSON value at p (no leading whitespace), validated only: the byte after it, or NULL */
static const uint8_t *jsonl_value(const uint8_t *p, const uint8_t *end, int depth) {
    if (p >= end) return NULL;
    switch (*p) {
    case '"': return jsonl_string(p + 1, end, 0, NULL, NULL, 0);
    case 't': return jsonl_literal(p, end, "true", 4);
    case 'f': return jsonl_literal(p, end, "false", 5);
    case 'n': return jsonl_literal(p, end, "null", 4);
    case '[':
    case '{': {
        const int object = *p == '{';
        const uint8_t close = object ? '}' : ']';
        if (depth >= JSONL_MAX_DEPTH) return NULL;
        p = jsonl_ws(p + 1, end);
        if (p < end && *p == close) return p + 1;
        for (;;) {
            if (object) {
                if (p >= end || *p != '"' || !(p = jsonl_string(p + 1, end, 0, NULL, NULL, 0))) return NULL;
                p = jsonl_ws(p, end);
                if (p >= end || *p != ':') return NULL;
                p = jsonl_ws(p + 1, end);
            }
            if (!(p = jsonl_value(p, end, depth + 1))) return NULL;
            p = jsonl_ws(p, end);
            if (p >= end) return NULL;
            if (*p == close) return p + 1;
            if (*p != ',') return NULL;
            p = jsonl_ws(p + 1, end);
        }
    }
    default: return jsonl_number(p, end);
    }
}

long jneox_jsonl_texts(const void *data, long n, const void *field, long field_len, int nl, void *out, long cap,
                       long *written) {
    const uint8_t *p = (const uint8_t *)data, *const end = p + (n > 0 ? n : 0);
    const uint8_t *const key = (const uint8_t *)field;
    uint8_t *o = (uint8_t *)out, *const oend = o + (cap > 0 ? cap : 0);
    long lines = 0;
    *written = 0;
    while (p < end) {
        p = jsonl_ws(p, end);
        if (p >= end || *p != '{') return -1; /* blank lines and other values: Python names them */
        p = jsonl_ws(p + 1, end);
        int found = 0;
        if (p < end && *p == '}') {
            p++;
        } else {
            for (;;) {
                if (p >= end || *p != '"') return -1;
                const uint8_t *k = ++p;
                if (!(p = jsonl_string(p, end, 0, NULL, NULL, 0))) return -1;
                const long klen = (long)(p - 1 - k);
                if (memchr(k, '\\', (size_t)klen)) return -1; /* an escaped key might spell the field */
                const int is_field = klen == field_len && memcmp(k, key, (size_t)klen) == 0;
                p = jsonl_ws(p, end);
                if (p >= end || *p != ':') return -1;
                p = jsonl_ws(p + 1, end);
                if (is_field) {
                    if (found || p >= end || *p != '"') return -1; /* twice, or not a string */
                    found = 1;
                    if (!(p = jsonl_string(p + 1, end, 1, &o, oend, nl))) return -1;
                    if (o >= oend) return -1;
                    *o++ = '\n';
                } else if (!(p = jsonl_value(p, end, 1))) {
                    return -1;
                }
                p = jsonl_ws(p, end);
                if (p >= end) return -1;
                if (*p == '}') {
                    p++;
                    break;
                }
                if (*p != ',') return -1;
                p = jsonl_ws(p + 1, end);
            }
        }
        if (!found) return -1;
        p = jsonl_ws(p, end);
        if (p < end) {
            if (*p != '\n') return -1;
            p++;
        }
        lines++;
    }
    *written = (long)(o - (uint8_t *)out);
    return lines;
}
