/*
 * powercut shim: an LD_PRELOAD library that lets a test cut power the way a disk would.
 *
 * For every regular file under the directory named by $POWERCUT_DIR (except SQLite's "-shm"
 * files, which live in shared memory and which a reboot erases anyway), each write or truncate
 * first appends an undo record to <POWERCUT_DIR>/.undo/<name>.undo:
 *
 *     struct { u32 magic 'PCU1'; u32 kind (0 write, 1 truncate); u64 offset; u64 length;
 *              u64 old_len; u64 old_size; } followed by old_len bytes
 *
 * where the old bytes are what the operation is about to overwrite (or, for a truncate, what it
 * cuts away) and old_size is the file's size before it. <name> is the file's path relative to
 * $POWERCUT_DIR with '%' written as "%25" and '/' as "%2F" (so it is the basename for a file
 * directly in the directory). Each record goes in with one write(2) on an O_APPEND descriptor:
 * it is in the page cache when the operation it guards starts, so it survives SIGKILL.
 *
 * A successful fsync/fdatasync of such a file truncates its undo log: everything written so far
 * is durable. Cutting the power (tests/power/powercut.py) applies the logs in reverse, which
 * drops exactly the writes no fsync covered.
 *
 * Every record-and-operation pair, and every sync-and-truncate-log pair, runs under an flock on
 * the undo log, so that records are in the order of the operations and a sync in one process
 * never discards the record of a write that another process has not finished yet.
 *
 * Metadata (create, unlink, rename) is durable at once: unlinking a file discards its undo log;
 * renaming one moves its log with it.
 *
 * The shim's own I/O uses the real functions (dlsym(RTLD_NEXT)) and a thread-local guard, so it
 * never records itself. If it cannot keep an undo record it aborts the process: a test that
 * silently stopped modelling the disk would pass for the wrong reason.
 *
 * Build: gcc -shared -fPIC -O2 -o shim.so shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAGIC 0x31554350u /* "PCU1" little-endian */
#define KIND_WRITE 0u
#define KIND_TRUNCATE 1u

struct record {
    uint32_t magic;
    uint32_t kind;
    uint64_t offset;
    uint64_t length;   /* bytes the write wrote (asked), or the truncate's new length */
    uint64_t old_len;  /* old bytes that follow */
    uint64_t old_size; /* the file's size before the operation */
};

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off64_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off64_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);

static char cut_dir[PATH_MAX]; /* realpath of $POWERCUT_DIR, "" when unset */
static size_t cut_dir_len;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static __thread int busy; /* this thread is inside the shim */

static void *must(const char *name) {
    void *fn = dlsym(RTLD_NEXT, name);
    if (!fn) {
        fprintf(stderr, "powercut shim: dlsym(%s) failed: %s\n", name, dlerror());
        abort();
    }
    return fn;
}

static void init(void) {
    real_write = must("write");
    real_pwrite = must("pwrite");
    real_pwrite64 = must("pwrite64");
    real_writev = must("writev");
    real_pwritev = must("pwritev");
    real_pwritev64 = must("pwritev64");
    real_ftruncate = must("ftruncate");
    real_ftruncate64 = must("ftruncate64");
    real_fsync = must("fsync");
    real_fdatasync = must("fdatasync");
    real_unlink = must("unlink");
    real_unlinkat = must("unlinkat");
    real_rename = must("rename");
    real_renameat = must("renameat");
    const char *dir = getenv("POWERCUT_DIR");
    if (dir && *dir) {
        if (!realpath(dir, cut_dir)) {
            fprintf(stderr, "powercut shim: POWERCUT_DIR=%s: %s\n", dir, strerror(errno));
            abort();
        }
        cut_dir_len = strlen(cut_dir);
    }
}

static void die(const char *what, const char *path) {
    char msg[PATH_MAX + 200];
    int n = snprintf(msg, sizeof msg, "powercut shim: %s %s: %s\n", what, path, strerror(errno));
    if (n > 0) real_write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
    abort();
}

static int ends_with(const char *s, const char *tail) {
    size_t a = strlen(s), b = strlen(tail);
    return a >= b && strcmp(s + a - b, tail) == 0;
}

/* Is this absolute, symlink-free path one the model covers? */
static int path_tracked(const char *path) {
    if (!cut_dir_len || strncmp(path, cut_dir, cut_dir_len) != 0 || path[cut_dir_len] != '/')
        return 0;
    const char *rel = path + cut_dir_len + 1;
    if (!*rel || strncmp(rel, ".undo", 5) == 0) return 0;
    if (ends_with(path, "-shm") || ends_with(path, " (deleted)")) return 0;
    return 1;
}

/* The path of fd if it is a tracked regular file (into path); 0 otherwise. */
static int fd_tracked(int fd, char *path) {
    if (!cut_dir_len || fd < 0) return 0;
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, PATH_MAX - 1);
    if (n <= 0) return 0;
    path[n] = '\0';
    if (!path_tracked(path)) return 0;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return 0;
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0 && (flags & (O_SYNC | O_DSYNC))) return 0; /* durable when the call returns */
    return 1;
}

/* The undo log's path for a tracked file's path. */
static void log_path(const char *path, char *out) {
    size_t n = (size_t)snprintf(out, PATH_MAX, "%s/.undo/", cut_dir);
    for (const char *p = path + cut_dir_len + 1; *p && n + 8 < PATH_MAX; p++) {
        if (*p == '/' || *p == '%') n += (size_t)snprintf(out + n, PATH_MAX - n, "%%%02X", (unsigned char)*p);
        else out[n++] = *p;
    }
    out[n] = '\0';
    if (n + 6 >= PATH_MAX) { errno = ENAMETOOLONG; die("undo log name too long for", path); }
    strcat(out, ".undo");
}

/* Open (creating) and flock the undo log of a tracked file. */
static int lock_log(const char *path) {
    char lp[PATH_MAX];
    log_path(path, lp);
    int fd = open(lp, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0 && errno == ENOENT) {
        char dir[PATH_MAX + 8];
        snprintf(dir, sizeof dir, "%s/.undo", cut_dir);
        if (mkdir(dir, 0700) != 0 && errno != EEXIST) die("cannot create", dir);
        fd = open(lp, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    }
    if (fd < 0) die("cannot open undo log", lp);
    while (flock(fd, LOCK_EX) != 0)
        if (errno != EINTR) die("cannot lock undo log", lp);
    return fd;
}

static void unlock_log(int logfd) {
    flock(logfd, LOCK_UN);
    close(logfd);
}

static void write_all(int fd, const char *buf, size_t len, const char *path) {
    while (len) {
        ssize_t n = real_write(fd, buf, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) die("cannot write undo record for", path);
        buf += n;
        len -= (size_t)n;
    }
}

/* Append the undo record for an operation on fd that replaces [offset, offset+span) (a write
 * of span bytes; a truncate to offset with span = what lies past it) and sets no size below
 * offset. */
static void record(int logfd, int fd, uint32_t kind, uint64_t offset, uint64_t length, const char *path) {
    struct stat st;
    if (fstat(fd, &st) != 0) die("cannot stat", path);
    uint64_t size = (uint64_t)st.st_size;
    uint64_t span = kind == KIND_WRITE ? length : (size > offset ? size - offset : 0);
    uint64_t old_len = offset < size ? (size - offset < span ? size - offset : span) : 0;
    char *buf = malloc(sizeof(struct record) + old_len);
    if (!buf) die("out of memory for", path);
    uint64_t got = 0;
    while (got < old_len) {
        ssize_t n = pread(fd, buf + sizeof(struct record) + got, old_len - got, (off_t)(offset + got));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("cannot read old bytes of", path);
        if (n == 0) break; /* shrank under us: keep what is there */
        got += (uint64_t)n;
    }
    struct record rec = {MAGIC, kind, offset, length, got, size};
    memcpy(buf, &rec, sizeof rec);
    write_all(logfd, buf, sizeof rec + got, path);
    free(buf);
}

static size_t iov_total(const struct iovec *iov, int cnt) {
    size_t total = 0;
    for (int i = 0; i < cnt; i++) total += iov[i].iov_len;
    return total;
}

/* ---- writes ---------------------------------------------------------------------------- */

#define GUARDED(fd, offset_expr, length, kind, call)                                           \
    do {                                                                                      \
        pthread_once(&once, init);                                                            \
        char path_[PATH_MAX];                                                                 \
        if (busy || !fd_tracked(fd, path_)) return call;                                      \
        busy = 1;                                                                             \
        int logfd_ = lock_log(path_);                                                         \
        record(logfd_, fd, kind, (uint64_t)(offset_expr), (uint64_t)(length), path_);         \
        __typeof__(call) r_ = call;                                                           \
        int e_ = errno;                                                                       \
        unlock_log(logfd_);                                                                   \
        busy = 0;                                                                             \
        errno = e_;                                                                           \
        return r_;                                                                            \
    } while (0)

/* Where write(2) on fd will put its bytes. */
static off_t current_offset(int fd) {
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0 && (flags & O_APPEND)) {
        struct stat st;
        return fstat(fd, &st) == 0 ? st.st_size : 0;
    }
    off_t at = lseek(fd, 0, SEEK_CUR);
    return at < 0 ? 0 : at;
}

ssize_t write(int fd, const void *buf, size_t count) {
    GUARDED(fd, current_offset(fd), count, KIND_WRITE, real_write(fd, buf, count));
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    GUARDED(fd, offset, count, KIND_WRITE, real_pwrite(fd, buf, count, offset));
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t offset) {
    GUARDED(fd, offset, count, KIND_WRITE, real_pwrite64(fd, buf, count, offset));
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    GUARDED(fd, current_offset(fd), iov_total(iov, iovcnt), KIND_WRITE, real_writev(fd, iov, iovcnt));
}

ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    GUARDED(fd, offset, iov_total(iov, iovcnt), KIND_WRITE, real_pwritev(fd, iov, iovcnt, offset));
}

ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, off64_t offset) {
    GUARDED(fd, offset, iov_total(iov, iovcnt), KIND_WRITE, real_pwritev64(fd, iov, iovcnt, offset));
}

int ftruncate(int fd, off_t length) {
    if (length < 0) { pthread_once(&once, init); return real_ftruncate(fd, length); }
    GUARDED(fd, length, length, KIND_TRUNCATE, real_ftruncate(fd, length));
}

int ftruncate64(int fd, off64_t length) {
    if (length < 0) { pthread_once(&once, init); return real_ftruncate64(fd, length); }
    GUARDED(fd, length, length, KIND_TRUNCATE, real_ftruncate64(fd, length));
}

/* ---- syncs: everything written to the file so far is durable ---------------------------- */

static int synced(int fd, int (*sync)(int)) {
    pthread_once(&once, init);
    char path[PATH_MAX];
    if (busy || !fd_tracked(fd, path)) return sync(fd);
    busy = 1;
    int logfd = lock_log(path);
    int r = sync(fd);
    int e = errno;
    if (r == 0 && real_ftruncate(logfd, 0) != 0) die("cannot truncate undo log of", path);
    unlock_log(logfd);
    busy = 0;
    errno = e;
    return r;
}

int fsync(int fd) {
    pthread_once(&once, init);
    return synced(fd, real_fsync);
}

int fdatasync(int fd) {
    pthread_once(&once, init);
    return synced(fd, real_fdatasync);
}

/* ---- metadata: durable at once; keep the undo logs in step ---------------------------- */

/* The absolute, symlink-free form of (dirfd, path) without following the last component. */
static int resolve(int dirfd, const char *path, char *out) {
    char joined[PATH_MAX * 2];
    if (path[0] == '/') {
        snprintf(joined, sizeof joined, "%s", path);
    } else {
        char base[PATH_MAX];
        if (dirfd == AT_FDCWD) {
            if (!getcwd(base, sizeof base)) return 0;
        } else {
            char link[64];
            snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
            ssize_t n = readlink(link, base, sizeof base - 1);
            if (n <= 0) return 0;
            base[n] = '\0';
        }
        snprintf(joined, sizeof joined, "%s/%s", base, path);
    }
    char *slash = strrchr(joined, '/');
    const char *name = slash + 1;
    if (!*name || strcmp(name, ".") == 0 || strcmp(name, "..") == 0) return 0;
    char parent[PATH_MAX];
    *slash = '\0';
    if (!realpath(*joined ? joined : "/", parent)) return 0;
    if ((size_t)snprintf(out, PATH_MAX, "%s/%s", strcmp(parent, "/") == 0 ? "" : parent, name) >= PATH_MAX)
        return 0;
    return 1;
}

static int removed(int dirfd, const char *path, int (*call)(void)) {
    char abs[PATH_MAX];
    if (busy || !resolve(dirfd, path, abs) || !path_tracked(abs)) return call();
    busy = 1;
    int logfd = lock_log(abs);
    int r = call();
    int e = errno;
    if (r == 0) {
        char lp[PATH_MAX];
        log_path(abs, lp);
        real_unlink(lp); /* the file is gone: its unsynced writes no longer matter */
    }
    unlock_log(logfd);
    busy = 0;
    errno = e;
    return r;
}

static __thread struct { int dirfd; const char *path; int flags; } rm_args;
static int do_unlink(void) { return real_unlink(rm_args.path); }
static int do_unlinkat(void) { return real_unlinkat(rm_args.dirfd, rm_args.path, rm_args.flags); }

int unlink(const char *path) {
    pthread_once(&once, init);
    rm_args.path = path;
    return removed(AT_FDCWD, path, do_unlink);
}

int unlinkat(int dirfd, const char *path, int flags) {
    pthread_once(&once, init);
    if (flags & AT_REMOVEDIR) return real_unlinkat(dirfd, path, flags);
    rm_args.dirfd = dirfd;
    rm_args.path = path;
    rm_args.flags = flags;
    return removed(dirfd, path, do_unlinkat);
}

static int renamed(int olddirfd, const char *oldpath, int newdirfd, const char *newpath) {
    char src[PATH_MAX], dst[PATH_MAX];
    int have_src = resolve(olddirfd, oldpath, src) && path_tracked(src);
    int have_dst = resolve(newdirfd, newpath, dst) && path_tracked(dst);
    if (busy || (!have_src && !have_dst)) return real_renameat(olddirfd, oldpath, newdirfd, newpath);
    busy = 1;
    int logfd = lock_log(have_src ? src : dst);
    int r = real_renameat(olddirfd, oldpath, newdirfd, newpath);
    int e = errno;
    if (r == 0) {
        char slog[PATH_MAX], dlog[PATH_MAX];
        if (have_src) log_path(src, slog);
        if (have_dst) log_path(dst, dlog);
        if (have_src && have_dst) real_rename(slog, dlog); /* the writes move with the file */
        else if (have_src) real_unlink(slog);               /* left the modelled directory */
        else real_unlink(dlog);                             /* replaced from outside: durable */
    }
    unlock_log(logfd);
    busy = 0;
    errno = e;
    return r;
}

int rename(const char *oldpath, const char *newpath) {
    pthread_once(&once, init);
    return renamed(AT_FDCWD, oldpath, AT_FDCWD, newpath);
}

int renameat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath) {
    pthread_once(&once, init);
    return renamed(olddirfd, oldpath, newdirfd, newpath);
}
