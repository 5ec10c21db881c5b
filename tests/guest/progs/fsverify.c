/* fsverify DIR [OPS] [SEED]: random file I/O checked byte for byte against a shadow model.
 *
 * Two files (a, b) in DIR, each mirrored in memory. Operations, chosen by a seeded PRNG:
 * pwrite, pread (compared), ftruncate, fallocate (plain, KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE
 * with and without KEEP_SIZE), copy_file_range (b->a, a->b, and within a), SEEK_DATA /
 * SEEK_HOLE consistency, fstat size. File a is used through two separately opened fds (two
 * FUSE handles, possibly owned by different workers). Every 1000 ops, and at the end, both
 * files are read back whole through a fresh fd and compared with the model.
 *
 * Prints "PASS fsverify ops=N seed=S" or "FAIL fsverify: op #i (...): expected X got Y"
 * with the last operations; exit code = failures (it stops at the first).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAXSIZE (512 * 1024)
#define HISTORY 12

static uint64_t rng;
static uint64_t next64(void)
{
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545F4914F6CDD1DULL;
}
static uint64_t below(uint64_t n) { return n ? next64() % n : 0; }

struct file {
    const char *name;
    char path[4096];
    unsigned char *shadow;
    long size;
    int fd[2];
};

static struct file F[2];
static char history[HISTORY][160];
static long opno;
static unsigned char *scratch;

static void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void note(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(history[opno % HISTORY], sizeof history[0], fmt, ap);
    va_end(ap);
}

static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *fmt, ...)
{
    va_list ap;
    printf("FAIL fsverify: op #%ld (%s): ", opno, history[opno % HISTORY]);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\nlast operations:\n");
    for (long i = opno - HISTORY + 1; i <= opno; i++)
        if (i >= 0)
            printf("  #%ld %s\n", i, history[i % HISTORY]);
    fflush(stdout);
    exit(1);
}

static void fill(unsigned char *p, long n)
{
    uint64_t v = next64();
    for (long i = 0; i < n; i++) {
        if ((i & 7) == 0)
            v = next64();
        p[i] = (unsigned char)(v >> ((i & 7) * 8));
    }
    if (n > 0 && below(4) == 0)
        memset(p, 0, n / 2); /* some zero runs, so holes and data look alike */
}

static void compare(struct file *f, const unsigned char *got, long off, long n, const char *how)
{
    for (long i = 0; i < n; i++)
        if (got[i] != f->shadow[off + i])
            fail("%s %s: byte %ld: expected %02x got %02x", how, f->name, off + i,
                 f->shadow[off + i], got[i]);
}

static void verify_whole(struct file *f)
{
    int fd = open(f->path, O_RDONLY);
    if (fd < 0)
        fail("reopen %s: %s", f->name, strerror(errno));
    struct stat st;
    fstat(fd, &st);
    if (st.st_size != f->size)
        fail("size of %s: expected %ld got %lld", f->name, f->size, (long long)st.st_size);
    long done = 0;
    while (done < f->size) {
        ssize_t r = pread(fd, scratch, f->size - done, done);
        if (r <= 0)
            fail("read back %s at %ld: expected data got %zd (%s)", f->name, done, r,
                 strerror(errno));
        compare(f, scratch, done, r, "read back");
        done += r;
    }
    if (pread(fd, scratch, 1, f->size) != 0)
        fail("read past EOF of %s: expected 0 bytes", f->name);
    close(fd);
}

static void set_size(struct file *f, long size)
{
    if (size > f->size)
        memset(f->shadow + f->size, 0, size - f->size);
    f->size = size;
}

static void op_write(struct file *f, int fd)
{
    long off = below(MAXSIZE - 1), n = 1 + below(below(4) ? 4096 : 65536);
    if (off + n > MAXSIZE)
        n = MAXSIZE - off;
    note("pwrite fd%d off=%ld len=%ld", fd, off, n);
    fill(scratch, n);
    ssize_t r = pwrite(f->fd[fd], scratch, n, off);
    if (r != n)
        fail("pwrite: expected %ld got %zd (%s)", n, r, strerror(errno));
    if (off > f->size)
        set_size(f, off);
    memcpy(f->shadow + off, scratch, n);
    if (off + n > f->size)
        f->size = off + n;
}

static void op_read(struct file *f, int fd)
{
    long off = below(f->size + 100), n = 1 + below(below(4) ? 4096 : 131072);
    note("pread fd%d off=%ld len=%ld", fd, off, n);
    ssize_t r = pread(f->fd[fd], scratch, n, off);
    long want = off >= f->size ? 0 : (off + n > f->size ? f->size - off : n);
    if (r != want)
        fail("pread: expected %ld bytes got %zd (%s)", want, r, strerror(errno));
    compare(f, scratch, off, r, "pread");
}

static void op_truncate(struct file *f, int fd)
{
    long size = below(4) ? below(MAXSIZE) : below(4096);
    note("ftruncate fd%d size=%ld", fd, size);
    if (ftruncate(f->fd[fd], size))
        fail("ftruncate: %s", strerror(errno));
    set_size(f, size);
}

static void op_fallocate(struct file *f, int fd)
{
    static const int modes[] = {0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE};
    int mode = modes[below(5)];
    long off = below(MAXSIZE - 1), n = 1 + below(131072);
    if (off + n > MAXSIZE)
        n = MAXSIZE - off;
    note("fallocate mode=%d off=%ld len=%ld", mode, off, n);
    if (fallocate(f->fd[fd], mode, off, n))
        fail("fallocate: %s", strerror(errno));
    long end = off + n;
    if (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
        long zend = (mode & FALLOC_FL_KEEP_SIZE) && end > f->size ? f->size : end;
        if (zend > off) {
            if (off > f->size)
                set_size(f, off);
            memset(f->shadow + off, 0, zend - off);
        }
    }
    if (!(mode & FALLOC_FL_KEEP_SIZE) && end > f->size)
        set_size(f, end);
}

static void op_copy(struct file *src, int sfd, struct file *dst, int dfd)
{
    long n = 1 + below(below(4) ? 8192 : 131072);
    loff_t oi = below(src->size + 10), oo = below(MAXSIZE - 1);
    if (oo + n > MAXSIZE)
        n = MAXSIZE - oo;
    if (src == dst) {
        /* same file: ranges must not overlap */
        long len = oi >= src->size ? 0 : (oi + n > src->size ? src->size - oi : n);
        if (oo < oi + len && oi < oo + n)
            return;
    }
    long in0 = oi, out0 = oo;
    note("copy_file_range %s->%s off_in=%ld off_out=%ld len=%ld", src->name, dst->name, in0,
         out0, n);
    ssize_t r = copy_file_range(src->fd[sfd], &oi, dst->fd[dfd], &oo, n, 0);
    if (r < 0)
        fail("copy_file_range: %s", strerror(errno));
    long avail = in0 >= src->size ? 0 : src->size - in0;
    if (r > n || r > avail || (r == 0 && avail > 0 && n > 0))
        fail("copy_file_range: copied %zd of %ld (source has %ld)", r, n, avail);
    if (oi != in0 + r || oo != out0 + r)
        fail("copy_file_range: offsets %lld/%lld after %zd bytes", (long long)oi, (long long)oo, r);
    if (r > 0) {
        memmove(scratch, src->shadow + in0, r);
        if (out0 > dst->size)
            set_size(dst, out0);
        memcpy(dst->shadow + out0, scratch, r);
        if (out0 + r > dst->size)
            dst->size = out0 + r;
    }
}

static int zero_range(struct file *f, long a, long b)
{
    for (long i = a; i < b; i++)
        if (f->shadow[i])
            return 0;
    return 1;
}

static void op_seek(struct file *f, int fd)
{
    long off = below(f->size + 1);
    note("seek data/hole off=%ld size=%ld", off, f->size);
    off_t d = lseek(f->fd[fd], off, SEEK_DATA);
    if (d < 0) {
        if (errno != ENXIO)
            fail("SEEK_DATA: %s", strerror(errno));
        if (!zero_range(f, off, f->size))
            fail("SEEK_DATA: ENXIO but data follows %ld", off);
    } else if (d < off || d > f->size || !zero_range(f, off, d)) {
        fail("SEEK_DATA from %ld: %lld skips data or leaves the file", off, (long long)d);
    }
    off_t h = lseek(f->fd[fd], off, SEEK_HOLE);
    if (off < f->size) {
        if (h < off || h > f->size)
            fail("SEEK_HOLE from %ld: %lld outside [off, size]", off, (long long)h);
        if (h < f->size && f->shadow[h] != 0)
            fail("SEEK_HOLE from %ld: %lld is not zero", off, (long long)h);
    }
}

static void op_stat(struct file *f, int fd)
{
    struct stat st;
    note("fstat fd%d size=%ld", fd, f->size);
    if (fstat(f->fd[fd], &st))
        fail("fstat: %s", strerror(errno));
    if (st.st_size != f->size)
        fail("fstat size: expected %ld got %lld", f->size, (long long)st.st_size);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: fsverify DIR [OPS] [SEED]\n");
        return 2;
    }
    long ops = argc > 2 ? atol(argv[2]) : 20000;
    uint64_t seed = argc > 3 ? strtoull(argv[3], NULL, 0) : 20240611;
    rng = seed * 0x9E3779B97F4A7C15ULL + 1;
    setvbuf(stdout, NULL, _IOLBF, 0);
    scratch = malloc(2 * MAXSIZE);
    const char *names[2] = {"a", "b"};
    for (int i = 0; i < 2; i++) {
        F[i].name = names[i];
        snprintf(F[i].path, sizeof F[i].path, "%s/fsverify.%s", argv[1], names[i]);
        F[i].shadow = calloc(MAXSIZE, 1);
        F[i].fd[0] = open(F[i].path, O_RDWR | O_CREAT | O_TRUNC, 0644);
        F[i].fd[1] = open(F[i].path, O_RDWR);
        if (F[i].fd[0] < 0 || F[i].fd[1] < 0) {
            printf("FAIL fsverify: open %s: %s\n", F[i].path, strerror(errno));
            return 1;
        }
    }
    long counts[8] = {0};
    for (opno = 0; opno < ops; opno++) {
        struct file *a = &F[0], *b = &F[1];
        struct file *f = below(5) ? a : b;
        int fd = (int)below(2);
        int what = (int)below(100);
        if (what < 30) {
            op_write(f, fd);
            counts[0]++;
        } else if (what < 55) {
            op_read(f, fd);
            counts[1]++;
        } else if (what < 62) {
            op_truncate(f, fd);
            counts[2]++;
        } else if (what < 75) {
            op_fallocate(f, fd);
            counts[3]++;
        } else if (what < 88) {
            int k = (int)below(3);
            if (k == 0)
                op_copy(b, (int)below(2), a, fd);
            else if (k == 1)
                op_copy(a, fd, b, (int)below(2));
            else
                op_copy(a, fd, a, (int)below(2));
            counts[4]++;
        } else if (what < 95) {
            op_seek(f, fd);
            counts[5]++;
        } else {
            op_stat(f, fd);
            counts[6]++;
        }
        if (opno % 1000 == 999) {
            verify_whole(a);
            verify_whole(b);
        }
    }
    verify_whole(&F[0]);
    verify_whole(&F[1]);
    printf("PASS fsverify ops=%ld seed=%llu (write %ld read %ld truncate %ld fallocate %ld "
           "copy %ld seek %ld stat %ld)\n", ops, (unsigned long long)seed, counts[0], counts[1],
           counts[2], counts[3], counts[4], counts[5], counts[6]);
    for (int i = 0; i < 2; i++) {
        close(F[i].fd[0]);
        close(F[i].fd[1]);
        unlink(F[i].path);
    }
    return 0;
}
