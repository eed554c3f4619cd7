// The conformance userland: one preview 1 command that is many programs, picked by the name
// it runs as (the last part of argv[0], without ".wasm"), or by its first argument when that
// name is none of theirs (run as "box", or as a container named otherwise). It is what
// critest's images hold: sh, echo, sleep, top, cat, ls, hostname, pgrep, true, false and env.
// (Their web server is net.c run as httpd, a program of its own: a C program that mixes
// wit-bindgen bindings with preview 1 calls such as path_open or poll_oneoff traps with
// "cannot leave component instance" at the first list an import returns.)
//
// sh runs `-c SCRIPT`, a script file, or the commands it reads from stdin (no prompt). It knows
// words with '...' and "..." quoting, $NAME, ${NAME} and $?; `;`, newlines, `&&`, `||`;
// `while`/`until ... do ... done` and `if ... then ... [else ...] fi`; the builtins exit, cd
// and `:`. Every other command is one of the programs above, run in the same instance (a wasm
// instance cannot start another process).
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static const char *base_name(const char *path) {
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

static int echo_main(int argc, char **argv) {
    int i = 1, newline = 1;
    if (i < argc && !strcmp(argv[i], "-n")) {
        newline = 0;
        i++;
    }
    for (int first = i; i < argc; i++) {
        if (i > first) fputc(' ', stdout);
        fputs(argv[i], stdout);
    }
    if (newline) fputc('\n', stdout);
    return 0;
}

static void sleep_for(double seconds) {
    if (seconds <= 0) return;
    struct timespec ts = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    while (nanosleep(&ts, &ts) && errno == EINTR) {
    }
}

static int sleep_main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "sleep: missing operand\n");
        return 1;
    }
    char *end;
    double s = strtod(argv[1], &end);
    if (end == argv[1] || (*end && strcmp(end, "s"))) {
        fprintf(stderr, "sleep: invalid number '%s'\n", argv[1]);
        return 1;
    }
    sleep_for(s);
    return 0;
}

// There is no process table inside a wasm instance: top shows its header and waits.
static int top_main(int argc, char **argv) {
    printf("top: 1 task (this instance)\n");
    fflush(stdout);
    for (;;) sleep_for(3600);
}

static int cat_fd(FILE *f) {
    char buf[16384];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) fwrite(buf, 1, n, stdout);
    return ferror(f) ? 1 : 0;
}

static int cat_main(int argc, char **argv) {
    if (argc < 2) return cat_fd(stdin);
    int rc = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-")) {
            rc |= cat_fd(stdin);
            continue;
        }
        FILE *f = fopen(argv[i], "r");
        if (!f) {
            fprintf(stderr, "cat: %s: %s\n", argv[i], strerror(errno));
            rc = 1;
            continue;
        }
        rc |= cat_fd(f);
        fclose(f);
    }
    return rc;
}

static int by_name(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

// ls [-a|-A] [-1] [PATH...]: a directory's entries sorted by name, one per line.
static int ls_main(int argc, char **argv) {
    int all = 0, almost = 0, rc = 0, npaths = 0;
    const char *paths[64];
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] == '-' && argv[i][1]) {
            for (const char *o = argv[i] + 1; *o; o++) {
                if (*o == 'a') all = 1;
                else if (*o == 'A') almost = 1;
                else if (*o != '1') {
                    fprintf(stderr, "ls: unknown option -- %c\n", *o);
                    return 2;
                }
            }
        } else if (npaths < 64) {
            paths[npaths++] = argv[i];
        }
    }
    if (!npaths) paths[npaths++] = ".";
    for (int p = 0; p < npaths; p++) {
        struct stat st;
        if (stat(paths[p], &st)) {
            fprintf(stderr, "ls: %s: %s\n", paths[p], strerror(errno));
            rc = 1;
            continue;
        }
        if (!S_ISDIR(st.st_mode)) {
            printf("%s\n", paths[p]);
            continue;
        }
        DIR *d = opendir(paths[p]);
        if (!d) {
            fprintf(stderr, "ls: %s: %s\n", paths[p], strerror(errno));
            rc = 1;
            continue;
        }
        if (npaths > 1) printf("%s%s:\n", p ? "\n" : "", paths[p]);
        char **names = NULL;
        size_t n = 0, cap = 0;
        for (struct dirent *e; (e = readdir(d));) {
            int dots = !strcmp(e->d_name, ".") || !strcmp(e->d_name, "..");
            if (e->d_name[0] == '.' && !all && (!almost || dots)) continue;
            if (n == cap) names = realloc(names, (cap = cap ? cap * 2 : 32) * sizeof *names);
            names[n++] = strdup(e->d_name);
        }
        closedir(d);
        if (n) qsort(names, n, sizeof *names, by_name);
        for (size_t i = 0; i < n; i++) {
            printf("%s\n", names[i]);
            free(names[i]);
        }
        free(names);
    }
    return rc;
}

static int hostname_main(int argc, char **argv) {
    char buf[256] = "";
    FILE *f = fopen("/etc/hostname", "r");
    if (f) {
        if (!fgets(buf, sizeof buf, f)) buf[0] = 0;
        fclose(f);
    }
    buf[strcspn(buf, "\n")] = 0;
    if (!buf[0] && getenv("HOSTNAME")) snprintf(buf, sizeof buf, "%s", getenv("HOSTNAME"));
    printf("%s\n", buf);
    return 0;
}

// An instance sees no other processes: nothing ever matches.
static int pgrep_main(int argc, char **argv) { return 1; }

static int true_main(int argc, char **argv) { return 0; }

static int false_main(int argc, char **argv) { return 1; }

static int env_main(int argc, char **argv) {
    for (char **e = environ; *e; e++) printf("%s\n", *e);
    return 0;
}

static int sh_main(int argc, char **argv);

struct applet {
    const char *name;
    int (*run)(int, char **);
};

static const struct applet APPLETS[] = {
    {"sh", sh_main},         {"echo", echo_main},   {"sleep", sleep_main}, {"top", top_main},
    {"cat", cat_main},       {"ls", ls_main},       {"hostname", hostname_main},
    {"pgrep", pgrep_main},   {"true", true_main},   {"false", false_main}, {"env", env_main},
};

static const struct applet *find_applet(const char *path) {
    char name[64];
    snprintf(name, sizeof name, "%s", base_name(path));
    size_t len = strlen(name);
    if (len > 5 && !strcmp(name + len - 5, ".wasm")) name[len - 5] = 0;
    for (size_t i = 0; i < sizeof APPLETS / sizeof *APPLETS; i++)
        if (!strcmp(APPLETS[i].name, name)) return &APPLETS[i];
    return NULL;
}

// ---- sh ----

enum tok_kind { T_WORD, T_SEP, T_AND, T_OR, T_EOF };

struct tok {
    enum tok_kind kind;
    const char *text; // T_WORD: the raw word, quotes included
    size_t len;
};

struct script {
    struct tok *toks;
    int ntoks;
    int status; // $?
    int exiting;
    int error; // 1: syntax error, 2: the script ends inside a construct
};

// Splits `src` into tokens; words keep their quotes (expanded when they run).
static int tokenize(struct script *s, const char *src) {
    int cap = 64;
    s->toks = malloc(cap * sizeof *s->toks);
    s->ntoks = 0;
    const char *p = src;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\r') p++;
        if (*p == '#') {
            while (*p && *p != '\n') p++;
        }
        if (s->ntoks + 1 >= cap) s->toks = realloc(s->toks, (cap *= 2) * sizeof *s->toks);
        struct tok *t = &s->toks[s->ntoks];
        t->text = p;
        if (!*p) {
            t->kind = T_EOF;
            t->len = 0;
            s->ntoks++;
            return 0;
        }
        if (*p == ';' || *p == '\n' || (*p == '&' && p[1] != '&')) {
            t->kind = T_SEP;
            t->len = 1;
            p++;
        } else if (*p == '&' || (*p == '|' && p[1] == '|')) {
            t->kind = *p == '&' ? T_AND : T_OR;
            t->len = 2;
            p += 2;
        } else if (*p == '|') {
            fprintf(stderr, "sh: pipelines are not supported\n");
            return -1;
        } else {
            t->kind = T_WORD;
            while (*p && !strchr(" \t\r\n;&|", *p)) {
                if (*p == '\'' || *p == '"') {
                    char q = *p++;
                    while (*p && *p != q) p += (q == '"' && *p == '\\' && p[1]) ? 2 : 1;
                    if (!*p) {
                        fprintf(stderr, "sh: unterminated quoted string\n");
                        return -2;
                    }
                    p++;
                } else if (*p == '\\' && p[1]) {
                    p += 2;
                } else {
                    p++;
                }
            }
            t->len = (size_t)(p - t->text);
        }
        s->ntoks++;
    }
}

struct buf {
    char *data;
    size_t len, cap;
};

static void put(struct buf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->data = realloc(b->data, b->cap);
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

// $NAME, ${NAME} or $? at p (just after the '$'); returns where the reference ends.
static const char *expand_var(struct script *s, const char *p, const char *end, struct buf *out) {
    char name[128];
    size_t n = 0;
    if (p < end && *p == '?') {
        char code[16];
        snprintf(code, sizeof code, "%d", s->status);
        put(out, code, strlen(code));
        return p + 1;
    }
    int braced = p < end && *p == '{';
    if (braced) p++;
    while (p < end && (isalnum((unsigned char)*p) || *p == '_') && n < sizeof name - 1) name[n++] = *p++;
    name[n] = 0;
    if (braced && p < end && *p == '}') p++;
    if (!n) {
        put(out, "$", 1);
        return p;
    }
    const char *v = getenv(name);
    if (v) put(out, v, strlen(v));
    return p;
}

// A raw word with its quotes removed and its variables expanded.
static char *expand(struct script *s, const struct tok *t) {
    struct buf out = {0};
    put(&out, "", 0);
    const char *p = t->text, *end = t->text + t->len;
    while (p < end) {
        if (*p == '\'') {
            const char *close = memchr(p + 1, '\'', (size_t)(end - p - 1));
            put(&out, p + 1, (size_t)(close - p - 1));
            p = close + 1;
        } else if (*p == '"') {
            p++;
            while (p < end && *p != '"') {
                if (*p == '\\' && p + 1 < end && strchr("$\"\\`", p[1])) {
                    put(&out, p + 1, 1);
                    p += 2;
                } else if (*p == '$') {
                    p = expand_var(s, p + 1, end, &out);
                } else {
                    put(&out, p++, 1);
                }
            }
            p++;
        } else if (*p == '\\' && p + 1 < end) {
            put(&out, p + 1, 1);
            p += 2;
        } else if (*p == '$') {
            p = expand_var(s, p + 1, end, &out);
        } else {
            put(&out, p++, 1);
        }
    }
    return out.data;
}

static int is_word(const struct script *s, int pos, const char *w) {
    const struct tok *t = &s->toks[pos];
    return t->kind == T_WORD && t->len == strlen(w) && !memcmp(t->text, w, t->len);
}

static int at_stop(const struct script *s, int pos, const char *const *stops) {
    for (; stops && *stops; stops++)
        if (is_word(s, pos, *stops)) return 1;
    return 0;
}

static int run_list(struct script *s, int *pos, int run, const char *const *stops);

static int expect(struct script *s, int *pos, const char *word) {
    if (is_word(s, *pos, word)) {
        (*pos)++;
        return 1;
    }
    s->error = s->toks[*pos].kind == T_EOF ? 2 : 1;
    if (s->error == 1) fprintf(stderr, "sh: syntax error: expected \"%s\"\n", word);
    return 0;
}

static int is_assignment(const char *w) {
    if (!isalpha((unsigned char)*w) && *w != '_') return 0;
    while (isalnum((unsigned char)*w) || *w == '_') w++;
    return *w == '=';
}

static int simple_argv(struct script *s, int argc, char **argv);

static int simple(struct script *s, int *pos, int run) {
    int start = *pos;
    while (s->toks[*pos].kind == T_WORD) (*pos)++;
    int argc = *pos - start;
    if (!run || !argc) return s->status;
    char **argv = calloc((size_t)argc + 1, sizeof *argv);
    for (int i = 0; i < argc; i++) argv[i] = expand(s, &s->toks[start + i]);
    // Leading NAME=VALUE words set variables (for the shell and what it runs).
    int skip = 0;
    while (skip < argc && is_assignment(argv[skip])) {
        char *eq = strchr(argv[skip], '=');
        *eq = 0;
        setenv(argv[skip], eq + 1, 1);
        *eq = '=';
        skip++;
    }
    int rc;
    if (skip == argc) {
        rc = 0;
    } else if (skip) {
        rc = simple_argv(s, argc - skip, argv + skip);
    } else {
        rc = simple_argv(s, argc, argv);
    }
    fflush(stdout);
    fflush(stderr);
    for (int i = 0; i < argc; i++) free(argv[i]);
    free(argv);
    return rc;
}

// A builtin or a program, with its words expanded.
static int simple_argv(struct script *s, int argc, char **argv) {
    if (!strcmp(argv[0], "exit")) {
        s->exiting = 1;
        return argc > 1 ? atoi(argv[1]) : s->status;
    }
    if (!strcmp(argv[0], ":")) return 0;
    if (!strcmp(argv[0], "cd")) {
        const char *dir = argc > 1 ? argv[1] : (getenv("HOME") ? getenv("HOME") : "/");
        if (!chdir(dir)) return 0;
        fprintf(stderr, "sh: cd: %s: %s\n", dir, strerror(errno));
        return 1;
    }
    const struct applet *a = find_applet(argv[0]);
    if (a) return a->run(argc, argv);
    fprintf(stderr, "sh: %s: not found\n", argv[0]);
    return 127;
}

static const char *const DO[] = {"do", NULL};
static const char *const DONE[] = {"done", NULL};
static const char *const THEN[] = {"then", NULL};
static const char *const ELSE_FI[] = {"else", "fi", NULL};
static const char *const FI[] = {"fi", NULL};

static int command(struct script *s, int *pos, int run) {
    if (is_word(s, *pos, "while") || is_word(s, *pos, "until")) {
        int until = is_word(s, *pos, "until");
        int cond_at = ++*pos, rc = 0;
        for (;;) {
            *pos = cond_at;
            int c = run_list(s, pos, run, DO);
            if (s->error || !expect(s, pos, "do")) return 1;
            int go = run && !s->exiting && ((c == 0) != until);
            int body = run_list(s, pos, go, DONE);
            if (s->error || !expect(s, pos, "done")) return 1;
            if (!go) break;
            rc = body;
            if (s->exiting) break;
        }
        return rc;
    }
    if (is_word(s, *pos, "if")) {
        ++*pos;
        int c = run_list(s, pos, run, THEN);
        if (s->error || !expect(s, pos, "then")) return 1;
        int rc = run_list(s, pos, run && c == 0, ELSE_FI);
        if (s->error) return 1;
        if (is_word(s, *pos, "else")) {
            ++*pos;
            int other = run_list(s, pos, run && c != 0, FI);
            if (run && c != 0) rc = other;
        } else if (run && c != 0) {
            rc = 0;
        }
        if (s->error || !expect(s, pos, "fi")) return 1;
        return rc;
    }
    return simple(s, pos, run);
}

static int and_or(struct script *s, int *pos, int run) {
    int rc = command(s, pos, run);
    if (run) s->status = rc;
    while (!s->error && (s->toks[*pos].kind == T_AND || s->toks[*pos].kind == T_OR)) {
        int and = s->toks[*pos].kind == T_AND;
        ++*pos;
        while (s->toks[*pos].kind == T_SEP) ++*pos;
        int go = run && !s->exiting && (and ? rc == 0 : rc != 0);
        int next = command(s, pos, go);
        if (go) s->status = rc = next;
    }
    return rc;
}

// Runs commands until EOF or a word in `stops` in a command's place; returns the last status.
static int run_list(struct script *s, int *pos, int run, const char *const *stops) {
    int rc = 0;
    for (;;) {
        while (s->toks[*pos].kind == T_SEP) ++*pos;
        if (s->toks[*pos].kind == T_EOF) {
            if (stops) s->error = 2;
            return rc;
        }
        if (at_stop(s, *pos, stops)) return rc;
        if (s->toks[*pos].kind != T_WORD) {
            fprintf(stderr, "sh: syntax error near \"%.*s\"\n", (int)s->toks[*pos].len, s->toks[*pos].text);
            s->error = 1;
            return 2;
        }
        rc = and_or(s, pos, run && !s->exiting);
        if (s->error) return 2;
        if (s->toks[*pos].kind == T_WORD && !at_stop(s, *pos, stops)) {
            s->error = 1;
            return 2;
        }
    }
}

// Checks `src` (0 complete, 1 syntax error, 2 incomplete), then runs it when complete.
static int run_script(struct script *s, const char *src, int check_only) {
    if (tokenize(s, src)) {
        free(s->toks);
        s->status = 2;
        return 1;
    }
    int pos = 0;
    s->error = 0;
    run_list(s, &pos, 0, NULL);
    int verdict = s->error;
    if (!verdict && !check_only) {
        pos = 0;
        s->status = run_list(s, &pos, 1, NULL);
    }
    free(s->toks);
    return verdict;
}

static int sh_main(int argc, char **argv) {
    struct script s = {0};
    if (argc >= 3 && !strcmp(argv[1], "-c")) {
        if (run_script(&s, argv[2], 0) == 2) {
            fprintf(stderr, "sh: syntax error: unexpected end of file\n");
            return 2;
        }
        return s.status;
    }
    FILE *in = stdin;
    if (argc >= 2) {
        in = fopen(argv[1], "r");
        if (!in) {
            fprintf(stderr, "sh: %s: %s\n", argv[1], strerror(errno));
            return 127;
        }
    }
    // Line by line (no prompt); a construct that spans lines waits for its end.
    struct buf pending = {0};
    put(&pending, "", 0);
    char line[8192];
    while (!s.exiting && fgets(line, sizeof line, in)) {
        put(&pending, line, strlen(line));
        if (run_script(&s, pending.data, 1) == 2) continue;
        run_script(&s, pending.data, 0);
        pending.len = 0;
        pending.data[0] = 0;
    }
    if (in != stdin) fclose(in);
    return s.status;
}

int main(int argc, char **argv) {
    // Run as box, or under a name that is none of its programs' (a container's argv[0] may be
    // its name): the first argument picks the program.
    const struct applet *a = argc ? find_applet(argv[0]) : NULL;
    if (!a && argc > 1) {
        argv++;
        argc--;
        a = find_applet(argv[0]);
    }
    if (!a) {
        fprintf(stderr, "box: %s: applet not found (sh echo sleep top cat ls hostname pgrep true false env)\n",
                argc ? argv[0] : "");
        return 127;
    }
    int rc = a->run(argc, argv);
    fflush(stdout);
    return rc;
}
