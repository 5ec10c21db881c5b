/* conform: POSIX behaviour checks for a shared file system, run as root.
 *
 *   conform suite DIR [-u UID:GID] [-g FOREIGN_GID] [-m OTHER_MOUNT_DIR] [-x]
 *   conform readdir DIR COUNT       DIR holds e000000..e<COUNT-1>; list them while the
 *                                   directory changes: each must be seen exactly once
 *   conform holddir DIR GOFILE      hold DIR open until GOFILE exists (someone deletes DIR
 *                                   meanwhile), then check what a deleted directory does
 *   conform lockhold FILE GOFILE    hold an fcntl write lock on bytes [0,10) and a flock
 *                                   LOCK_EX until GOFILE exists (prints READY)
 *   conform trylock FILE            print "fcntl LOCKED|FREE" and "flock LOCKED|FREE"
 *
 * One line per check: "PASS name" or "FAIL name: expected X got Y"; exit code = failures.
 * The same binary runs on the host file system (ext4) to prove the expectations.
 * Unprivileged checks run in a child with UID:GID (default 1000:1000, no supplementary
 * groups); FOREIGN_GID (default 4242) is a group that user is not in.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

static int failures;
static uid_t U = 1000;
static gid_t G = 1000;
static gid_t X = 4242;
static char base[2048];

static void pass(const char *name)
{
    printf("PASS %s\n", name);
    fflush(stdout);
}

static void fail(const char *name, const char *fmt, ...)
{
    va_list ap;
    printf("FAIL %s: ", name);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    failures++;
}

static const char *ename(int e)
{
    const char *n = strerrorname_np(e);
    return n ? n : "E?";
}

/* Expect `call` to fail with errno `err`. */
#define EXPECT_ERR(name, err, call)                                                  \
    do {                                                                             \
        errno = 0;                                                                   \
        long r_ = (long)(call);                                                      \
        int e_ = errno;                                                              \
        if (r_ == -1 && e_ == (err))                                                 \
            pass(name);                                                              \
        else if (r_ != -1)                                                           \
            fail(name, "expected %s got success (%ld)", ename(err), r_);            \
        else                                                                         \
            fail(name, "expected %s got %s", ename(err), ename(e_));                 \
    } while (0)

/* Expect `call` to succeed (not -1); the value is kept in `ok_r`. */
static long ok_r;
#define EXPECT_OK(name, call)                                                        \
    do {                                                                             \
        errno = 0;                                                                   \
        ok_r = (long)(call);                                                         \
        if (ok_r != -1)                                                              \
            pass(name);                                                              \
        else                                                                         \
            fail(name, "expected success got %s", ename(errno));                     \
    } while (0)

#define EXPECT_EQ(name, got, want)                                                   \
    do {                                                                             \
        long long g_ = (long long)(got), w_ = (long long)(want);                     \
        if (g_ == w_)                                                                \
            pass(name);                                                              \
        else                                                                         \
            fail(name, "expected %lld got %lld", w_, g_);                            \
    } while (0)

#define EXPECT_OCT(name, got, want)                                                  \
    do {                                                                             \
        unsigned g_ = (unsigned)(got), w_ = (unsigned)(want);                        \
        if (g_ == w_)                                                                \
            pass(name);                                                              \
        else                                                                         \
            fail(name, "expected %o got %o", w_, g_);                                \
    } while (0)

#define EXPECT_TRUE(name, cond, ...)                                                 \
    do {                                                                             \
        if (cond)                                                                    \
            pass(name);                                                              \
        else                                                                         \
            fail(name, __VA_ARGS__);                                                 \
    } while (0)

static void die(const char *what);

static const char *P(const char *rel)
{
    static char bufs[8][4096];
    static int i;
    char *b = bufs[i++ & 7];
    if (snprintf(b, sizeof bufs[0], "%s/%s", base, rel) >= (int)sizeof bufs[0])
        die("path too long");
    return b;
}

static void die(const char *what)
{
    fprintf(stderr, "conform: %s: %s\n", what, strerror(errno));
    printf("FAIL setup: %s: %s\n", what, ename(errno));
    exit(100);
}

static void put(const char *path, const char *data, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);
    if (fd < 0)
        die(path);
    if (write(fd, data, strlen(data)) != (ssize_t)strlen(data))
        die("write");
    if (fchmod(fd, mode) < 0)
        die("fchmod");
    close(fd);
}

static long long fsize(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (long long)st.st_size : -1;
}

static mode_t fmode(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0 ? st.st_mode & 07777 : (mode_t)-1;
}

static char *slurp(const char *path, char *buf, size_t n)
{
    int fd = open(path, O_RDONLY);
    buf[0] = 0;
    if (fd < 0)
        return buf;
    ssize_t r = read(fd, buf, n - 1);
    buf[r > 0 ? r : 0] = 0;
    close(fd);
    return buf;
}

static int rm_one(const char *p, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static void rmtree(const char *p)
{
    nftw(p, rm_one, 32, FTW_DEPTH | FTW_PHYS);
}

/* Run `fn` as the unprivileged user in a child; its failures count for us. */
static void as_user(void (*fn)(void))
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        if (setgroups(0, NULL) || setgid(G) || setuid(U))
            die("drop privileges");
        failures = 0;
        fn();
        fflush(stdout);
        _exit(failures);
    }
    int status;
    waitpid(pid, &status, 0);
    failures += WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

static int ts_eq(struct timespec a, long long sec, long nsec)
{
    return a.tv_sec == sec && a.tv_nsec == nsec;
}

/* ------------------------------------------------------------------ permissions */
static void user_perm(void)
{
    EXPECT_ERR("perm.open_0600_not_owner_eacces", EACCES, open(P("rootfile"), O_RDONLY));
    EXPECT_ERR("perm.create_in_0755_dir_eacces", EACCES,
               open(P("userfile"), O_WRONLY | O_CREAT, 0644));
    EXPECT_ERR("perm.chmod_not_owner_eperm", EPERM, chmod(P("rootfile"), 0666));
    EXPECT_ERR("perm.chown_not_owner_eperm", EPERM, chown(P("rootfile"), U, -1));
    EXPECT_ERR("perm.unlink_in_0755_dir_eacces", EACCES, unlink(P("rootfile")));
    EXPECT_ERR("perm.access_r_eacces", EACCES, access(P("rootfile"), R_OK));
    EXPECT_ERR("perm.mkdir_in_0755_dir_eacces", EACCES, mkdir(P("udir2"), 0755));
    EXPECT_ERR("perm.trunc_open_no_write_eacces", EACCES, open(P("pub644"), O_WRONLY | O_TRUNC));
    EXPECT_EQ("perm.trunc_open_refused_keeps_size", fsize(P("pub644")), 4);
    EXPECT_ERR("perm.search_0700_dir_eacces", EACCES, open(P("closed/inner"), O_RDONLY));

    int fd = open(P("u/f"), O_WRONLY | O_CREAT | O_EXCL, 0644);
    EXPECT_TRUE("perm.create_in_own_dir", fd >= 0, "open: %s", ename(errno));
    if (fd >= 0)
        close(fd);
    EXPECT_OK("perm.chmod_own", chmod(P("u/f"), 0600));
    EXPECT_OCT("perm.chmod_own_mode", fmode(P("u/f")), 0600);
    EXPECT_ERR("perm.chown_own_to_other_uid_eperm", EPERM, chown(P("u/f"), 0, -1));
    EXPECT_OK("perm.chgrp_own_to_own_group", chown(P("u/f"), -1, G));
    EXPECT_ERR("perm.chgrp_own_to_foreign_group_eperm", EPERM, chown(P("u/f"), -1, X));

    /* utimensat: explicit times need ownership; NOW needs write access. */
    struct timespec ts[2] = {{1234567890, 123456789}, {987654321, 500000000}};
    EXPECT_OK("time.utimens_own_explicit", utimensat(AT_FDCWD, P("u/f"), ts, 0));
    struct stat st;
    stat(P("u/f"), &st);
    EXPECT_TRUE("time.ns_precision_atime", ts_eq(st.st_atim, 1234567890, 123456789),
                "expected 1234567890.123456789 got %lld.%09ld", (long long)st.st_atim.tv_sec,
                st.st_atim.tv_nsec);
    EXPECT_TRUE("time.ns_precision_mtime", ts_eq(st.st_mtim, 987654321, 500000000),
                "expected 987654321.500000000 got %lld.%09ld", (long long)st.st_mtim.tv_sec,
                st.st_mtim.tv_nsec);
    EXPECT_ERR("time.utimens_not_owner_explicit_eperm", EPERM,
               utimensat(AT_FDCWD, P("pub666"), ts, 0));
    EXPECT_OK("time.utimens_not_owner_now_with_write", utimensat(AT_FDCWD, P("pub666"), NULL, 0));
    EXPECT_ERR("time.utimens_not_owner_now_without_write_eacces", EACCES,
               utimensat(AT_FDCWD, P("pub644"), NULL, 0));
    struct timespec omit_now[2] = {{0, UTIME_OMIT}, {0, UTIME_NOW}};
    EXPECT_ERR("time.utimens_not_owner_omit_now_eperm", EPERM,
               utimensat(AT_FDCWD, P("pub666"), omit_now, 0));

    /* chmod g+s on a file of a group we are not in: silently dropped. */
    EXPECT_OK("sgid.chmod_foreign_group_ok", chmod(P("u/xg"), 02755));
    EXPECT_OCT("sgid.chmod_foreign_group_strips_sgid", fmode(P("u/xg")), 0755);

    /* sticky directory */
    EXPECT_ERR("sticky.unlink_others_eperm", EPERM, unlink(P("sticky/rootf")));
    EXPECT_ERR("sticky.rename_others_eperm", EPERM, rename(P("sticky/rootf"), P("sticky/x")));
    fd = open(P("sticky/mine"), O_WRONLY | O_CREAT, 0644);
    if (fd >= 0)
        close(fd);
    EXPECT_ERR("sticky.rename_over_others_eperm", EPERM, rename(P("sticky/mine"), P("sticky/rootf")));
    EXPECT_OK("sticky.unlink_own", unlink(P("sticky/mine")));
    EXPECT_ERR("sticky.rmdir_others_dir_eperm", EPERM, rmdir(P("sticky/rootd")));

    /* setgid directory of a group we are not in */
    fd = open(P("sg/f"), O_WRONLY | O_CREAT, 02755);
    struct stat sf;
    fstat(fd, &sf);
    EXPECT_EQ("sgid.dir_file_inherits_group", sf.st_gid, X);
    EXPECT_OCT("sgid.dir_file_sgid_stripped_non_member", sf.st_mode & 07777, 0755);
    close(fd);
    mkdir(P("sg/d"), 0755);
    stat(P("sg/d"), &sf);
    EXPECT_EQ("sgid.dir_subdir_inherits_group", sf.st_gid, X);
    EXPECT_TRUE("sgid.dir_subdir_inherits_sgid", sf.st_mode & S_ISGID, "mode %o", sf.st_mode & 07777);

    /* suid/sgid cleared when an unprivileged owner writes or truncates */
    fd = open(P("u/s"), O_WRONLY | O_CREAT, 0700);
    fchmod(fd, 06770);
    EXPECT_OCT("kill.setup_06770", fmode(P("u/s")), 06770);
    EXPECT_EQ("kill.write_by_owner", write(fd, "x", 1), 1);
    close(fd);
    EXPECT_OCT("kill.write_by_owner_clears_suid_sgid", fmode(P("u/s")), 0770);
    chmod(P("u/s"), 06770);
    EXPECT_OK("kill.truncate_by_owner", truncate(P("u/s"), 0));
    EXPECT_OCT("kill.truncate_by_owner_clears_suid_sgid", fmode(P("u/s")), 0770);
    chmod(P("u/s"), 02760);
    fd = open(P("u/s"), O_WRONLY);
    if (write(fd, "y", 1) != 1)
        fail("kill.write_sgid_no_gx", "write: %s", ename(errno));
    close(fd);
    EXPECT_OCT("kill.write_keeps_sgid_without_group_exec", fmode(P("u/s")), 02760);
}

static void suite_perm(void)
{
    mkdir(P("u"), 0755);
    chown(P("u"), U, G);
    put(P("rootfile"), "secret", 0600);
    put(P("pub644"), "abcd", 0644);
    put(P("pub666"), "abcd", 0666);
    put(P("u/xg"), "x", 0755);
    chown(P("u/xg"), U, X);
    mkdir(P("closed"), 0700);
    put(P("closed/inner"), "x", 0644);
    mkdir(P("sticky"), 0777);
    chmod(P("sticky"), 01777);
    put(P("sticky/rootf"), "x", 0666);
    mkdir(P("sticky/rootd"), 0777);
    mkdir(P("sg"), 0777);
    chown(P("sg"), 0, X);
    chmod(P("sg"), 02777);
    as_user(user_perm);

    /* root-side counterparts */
    put(P("rs"), "x", 0755);
    chmod(P("rs"), 06775);
    int fd = open(P("rs"), O_WRONLY);
    if (write(fd, "y", 1) != 1)
        fail("kill.write_by_root", "write: %s", ename(errno));
    close(fd);
    EXPECT_OCT("kill.write_by_root_keeps_suid_sgid", fmode(P("rs")), 06775);
    chmod(P("rs"), 04755);
    EXPECT_OK("kill.chown_by_root", chown(P("rs"), 1, -1));
    EXPECT_OCT("kill.chown_clears_suid", fmode(P("rs")), 0755);
    chmod(P("rs"), 02775);
    EXPECT_OK("kill.chgrp_by_root", chown(P("rs"), -1, 1));
    EXPECT_OCT("kill.chown_clears_sgid_with_group_exec", fmode(P("rs")), 0775);
    fd = open(P("sg/rootfile"), O_WRONLY | O_CREAT, 02755);
    struct stat st;
    fstat(fd, &st);
    close(fd);
    EXPECT_OCT("sgid.dir_root_file_keeps_sgid", st.st_mode & 07777, 02755);

    struct timespec t1[2] = {{100, 5}, {200, 25}};
    utimensat(AT_FDCWD, P("pub644"), t1, 0);
    struct timespec t2[2] = {{0, UTIME_OMIT}, {300, 7}};
    EXPECT_OK("time.omit_atime", utimensat(AT_FDCWD, P("pub644"), t2, 0));
    stat(P("pub644"), &st);
    EXPECT_TRUE("time.omit_keeps_atime", ts_eq(st.st_atim, 100, 5), "atime %lld.%09ld",
                (long long)st.st_atim.tv_sec, st.st_atim.tv_nsec);
    EXPECT_TRUE("time.explicit_mtime_ns", ts_eq(st.st_mtim, 300, 7), "mtime %lld.%09ld",
                (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
    EXPECT_OK("time.now", utimensat(AT_FDCWD, P("pub644"), NULL, 0));
    stat(P("pub644"), &st);
    EXPECT_TRUE("time.now_sets_atime_mtime_ctime_equal",
                st.st_mtim.tv_sec == st.st_ctim.tv_sec && st.st_mtim.tv_nsec == st.st_ctim.tv_nsec
                    && st.st_atim.tv_sec == st.st_mtim.tv_sec && st.st_atim.tv_nsec == st.st_mtim.tv_nsec,
                "a %lld.%09ld m %lld.%09ld c %lld.%09ld", (long long)st.st_atim.tv_sec,
                st.st_atim.tv_nsec, (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec,
                (long long)st.st_ctim.tv_sec, st.st_ctim.tv_nsec);
    time_t now = time(NULL);
    EXPECT_TRUE("time.now_is_now", st.st_mtim.tv_sec > now - 60 && st.st_mtim.tv_sec < now + 60,
                "mtime %lld vs clock %lld", (long long)st.st_mtim.tv_sec, (long long)now);
    struct timespec old[2] = {{1000, 0}, {1000, 0}};
    utimensat(AT_FDCWD, P("pub644"), old, 0);
    fd = open(P("pub644"), O_WRONLY);
    if (write(fd, "z", 1) != 1)
        fail("time.write", "write: %s", ename(errno));
    close(fd);
    stat(P("pub644"), &st);
    EXPECT_TRUE("time.write_updates_mtime_ctime", st.st_mtim.tv_sec > 1000 && st.st_ctim.tv_sec > 1000,
                "mtime %lld ctime %lld", (long long)st.st_mtim.tv_sec, (long long)st.st_ctim.tv_sec);
}

/* ------------------------------------------------------------------ open flags, names */
static void suite_open(void)
{
    char buf[256];
    put(P("ap"), "abc", 0644);
    int fd = open(P("ap"), O_WRONLY | O_APPEND);
    EXPECT_EQ("append.pwrite_appends", pwrite(fd, "d", 1, 0), 1);
    EXPECT_EQ("append.offset_after_write", lseek(fd, 0, SEEK_CUR) >= 0, 1);
    int fd2 = open(P("ap"), O_WRONLY | O_APPEND);
    if (write(fd, "1", 1) != 1 || write(fd2, "2", 1) != 1 || write(fd, "3", 1) != 1)
        fail("append.write", "%s", ename(errno));
    close(fd);
    close(fd2);
    EXPECT_TRUE("append.two_fds_interleave", !strcmp(slurp(P("ap"), buf, sizeof buf), "abcd123"),
                "expected abcd123 got %s", buf);

    put(P("tr"), "0123456789", 0644);
    fd = open(P("tr"), O_WRONLY | O_TRUNC);
    EXPECT_EQ("trunc.open_wronly_trunc_empties", fsize(P("tr")), 0);
    close(fd);
    put(P("tr"), "0123456789", 0644);
    fd = open(P("tr"), O_RDWR | O_TRUNC | O_APPEND);
    EXPECT_EQ("trunc.open_rdwr_trunc_append", write(fd, "ab", 2), 2);
    close(fd);
    EXPECT_TRUE("trunc.then_write", !strcmp(slurp(P("tr"), buf, sizeof buf), "ab"), "got %s", buf);

    EXPECT_ERR("excl.existing_eexist", EEXIST, open(P("tr"), O_WRONLY | O_CREAT | O_EXCL, 0644));
    symlink("nowhere", P("dangling"));
    EXPECT_ERR("excl.dangling_symlink_eexist", EEXIST,
               open(P("dangling"), O_WRONLY | O_CREAT | O_EXCL, 0644));
    mkdir(P("adir"), 0755);
    EXPECT_ERR("excl.directory_eexist", EEXIST, open(P("adir"), O_WRONLY | O_CREAT | O_EXCL, 0644));
    fd = open(P("dangling"), O_WRONLY | O_CREAT, 0644);
    EXPECT_TRUE("creat.through_dangling_symlink_creates_target", fd >= 0 && fsize(P("nowhere")) == 0,
                "open %s", ename(errno));
    if (fd >= 0)
        close(fd);
    EXPECT_ERR("creat.missing_parent_enoent", ENOENT, open(P("nodir/f"), O_WRONLY | O_CREAT, 0644));

    char name[300];
    memset(name, 'n', 255);
    name[255] = 0;
    fd = open(P(name), O_WRONLY | O_CREAT, 0644);
    EXPECT_TRUE("name.255_bytes_ok", fd >= 0, "open: %s", ename(errno));
    if (fd >= 0)
        close(fd);
    memset(name, 'n', 256);
    name[256] = 0;
    EXPECT_ERR("name.256_bytes_create_enametoolong", ENAMETOOLONG, open(P(name), O_WRONLY | O_CREAT, 0644));
    struct stat st;
    EXPECT_ERR("name.256_bytes_stat_enametoolong", ENAMETOOLONG, stat(P(name), &st));
    EXPECT_ERR("name.256_bytes_mkdir_enametoolong", ENAMETOOLONG, mkdir(P(name), 0755));

    /* directories */
    mkdir(P("full"), 0755);
    put(P("full/x"), "x", 0644);
    EXPECT_ERR("dir.rmdir_nonempty_enotempty", ENOTEMPTY, rmdir(P("full")));
    mkdir(P("empty"), 0755);
    mkdir(P("src"), 0755);
    EXPECT_ERR("dir.rename_over_nonempty_enotempty", ENOTEMPTY, rename(P("src"), P("full")));
    EXPECT_OK("dir.rename_over_empty_dir", rename(P("src"), P("empty")));
    EXPECT_ERR("dir.rename_into_own_subdir_einval", EINVAL, rename(P("full"), P("full/sub")));
    EXPECT_ERR("dir.mkdir_existing_eexist", EEXIST, mkdir(P("full"), 0755));
    EXPECT_ERR("dir.rmdir_dot_einval", EINVAL, rmdir(P("full/.")));
    EXPECT_ERR("dir.link_to_directory_eperm", EPERM, link(P("full"), P("dlink")));
    mkdir(P("nl"), 0755);
    stat(P("nl"), &st);
    EXPECT_EQ("dir.nlink_empty_2", st.st_nlink, 2);
    mkdir(P("nl/a"), 0755);
    mkdir(P("nl/b"), 0755);
    stat(P("nl"), &st);
    EXPECT_EQ("dir.nlink_two_subdirs_4", st.st_nlink, 4);
    rmdir(P("nl/a"));
    stat(P("nl"), &st);
    EXPECT_EQ("dir.nlink_after_rmdir_3", st.st_nlink, 3);

    /* EISDIR / ENOTDIR */
    EXPECT_ERR("eisdir.open_dir_wronly", EISDIR, open(P("full"), O_WRONLY));
    EXPECT_ERR("eisdir.unlink_dir", EISDIR, unlink(P("full")));
    EXPECT_ERR("eisdir.rename_file_over_dir", EISDIR, rename(P("tr"), P("full")));
    fd = open(P("full"), O_RDONLY | O_DIRECTORY);
    EXPECT_ERR("eisdir.read_dir", EISDIR, read(fd, buf, sizeof buf));
    close(fd);
    EXPECT_ERR("enotdir.rename_dir_over_file", ENOTDIR, rename(P("full"), P("tr")));
    EXPECT_ERR("enotdir.rmdir_file", ENOTDIR, rmdir(P("tr")));
    EXPECT_ERR("enotdir.path_through_file", ENOTDIR, open(P("tr/x"), O_RDONLY));
    EXPECT_ERR("enotdir.o_directory_on_file", ENOTDIR, open(P("tr"), O_RDONLY | O_DIRECTORY));

    /* ELOOP, symlinks */
    symlink("tr", P("ln"));
    EXPECT_ERR("eloop.o_nofollow_on_symlink", ELOOP, open(P("ln"), O_RDONLY | O_NOFOLLOW));
    symlink("loop", P("loop"));
    EXPECT_ERR("eloop.self_loop", ELOOP, open(P("loop"), O_RDONLY));
    symlink("loopb", P("loopa"));
    symlink("loopa", P("loopb"));
    EXPECT_ERR("eloop.two_link_loop", ELOOP, stat(P("loopa"), &st));
    ssize_t n = readlink(P("ln"), buf, sizeof buf);
    EXPECT_TRUE("symlink.readlink", n == 2 && !memcmp(buf, "tr", 2), "got %zd", n);
    EXPECT_TRUE("symlink.follows", !strcmp(slurp(P("ln"), buf, sizeof buf), "ab"), "got %s", buf);
    lstat(P("ln"), &st);
    EXPECT_TRUE("symlink.lstat_is_link", S_ISLNK(st.st_mode) && st.st_size == 2, "mode %o size %lld",
                st.st_mode, (long long)st.st_size);
    EXPECT_ERR("fifo.mkfifo_existing_eexist", EEXIST, mkfifo(P("tr"), 0644));
    EXPECT_OK("fifo.mkfifo", mkfifo(P("fifo"), 0640));
    lstat(P("fifo"), &st);
    EXPECT_TRUE("fifo.is_fifo", S_ISFIFO(st.st_mode) && (st.st_mode & 0777) == 0640, "mode %o", st.st_mode);
    fd = open(P("tr"), O_RDONLY);
    EXPECT_ERR("ebadf.write_on_read_only_fd", EBADF, write(fd, "x", 1));
    close(fd);
}

/* ------------------------------------------------------------------ links, renames, data */
static void suite_files(const char *other)
{
    char buf[256];
    struct stat st, st2;

    /* an unlinked file that is still open keeps working */
    int fd = open(P("gone"), O_RDWR | O_CREAT, 0644);
    if (write(fd, "hello", 5) != 5)
        fail("unlinked.write", "%s", ename(errno));
    EXPECT_OK("unlinked.unlink", unlink(P("gone")));
    fstat(fd, &st);
    EXPECT_EQ("unlinked.nlink_0", st.st_nlink, 0);
    EXPECT_EQ("unlinked.pwrite", pwrite(fd, " world", 6, 5), 6);
    memset(buf, 0, sizeof buf);
    EXPECT_EQ("unlinked.pread", pread(fd, buf, sizeof buf, 0), 11);
    EXPECT_TRUE("unlinked.data", !strcmp(buf, "hello world"), "got %s", buf);
    EXPECT_OK("unlinked.ftruncate", ftruncate(fd, 3));
    fstat(fd, &st);
    EXPECT_EQ("unlinked.size_after_truncate", st.st_size, 3);
    EXPECT_OK("unlinked.fchmod", fchmod(fd, 0600));
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    int fd2 = open(proc, O_RDONLY);
    EXPECT_TRUE("unlinked.reopen_via_proc", fd2 >= 0 && read(fd2, buf, 3) == 3 && !memcmp(buf, "hel", 3),
                "%s", ename(errno));
    if (fd2 >= 0)
        close(fd2);
    EXPECT_ERR("unlinked.name_gone", ENOENT, stat(P("gone"), &st));
    close(fd);

    /* hard links */
    put(P("h1"), "data", 0644);
    EXPECT_OK("link.create", link(P("h1"), P("h2")));
    stat(P("h1"), &st);
    stat(P("h2"), &st2);
    EXPECT_EQ("link.nlink_2", st.st_nlink, 2);
    EXPECT_TRUE("link.same_inode", st.st_ino == st2.st_ino && st.st_dev == st2.st_dev, "ino %llu vs %llu",
                (unsigned long long)st.st_ino, (unsigned long long)st2.st_ino);
    EXPECT_ERR("link.existing_eexist", EEXIST, link(P("h1"), P("h2")));
    unlink(P("h1"));
    stat(P("h2"), &st);
    EXPECT_EQ("link.nlink_back_to_1", st.st_nlink, 1);
    EXPECT_TRUE("link.data_kept", !strcmp(slurp(P("h2"), buf, sizeof buf), "data"), "got %s", buf);
    symlink("h2", P("hs"));
    EXPECT_OK("link.hardlink_of_symlink", linkat(AT_FDCWD, P("hs"), AT_FDCWD, P("hs2"), 0));
    lstat(P("hs2"), &st);
    EXPECT_TRUE("link.hardlink_of_symlink_is_symlink", S_ISLNK(st.st_mode), "mode %o", st.st_mode);

    /* renames */
    put(P("ra"), "A", 0644);
    put(P("rb"), "B", 0644);
    stat(P("ra"), &st);
    EXPECT_OK("rename.over_existing", rename(P("ra"), P("rb")));
    stat(P("rb"), &st2);
    EXPECT_TRUE("rename.over_existing_replaces", st.st_ino == st2.st_ino && access(P("ra"), F_OK) < 0,
                "inode %llu vs %llu", (unsigned long long)st.st_ino, (unsigned long long)st2.st_ino);
    link(P("rb"), P("rc"));
    EXPECT_OK("rename.hardlinks_of_same_file_noop", rename(P("rb"), P("rc")));
    EXPECT_TRUE("rename.hardlinks_both_stay", access(P("rb"), F_OK) == 0 && access(P("rc"), F_OK) == 0,
                "a name vanished");
    put(P("rx"), "X", 0644);
    put(P("ry"), "Y", 0644);
    EXPECT_ERR("rename.noreplace_eexist", EEXIST,
               syscall(SYS_renameat2, AT_FDCWD, P("rx"), AT_FDCWD, P("ry"), RENAME_NOREPLACE));
    EXPECT_OK("rename.noreplace_free_name",
              syscall(SYS_renameat2, AT_FDCWD, P("rx"), AT_FDCWD, P("rz"), RENAME_NOREPLACE));
    EXPECT_OK("rename.exchange", syscall(SYS_renameat2, AT_FDCWD, P("rz"), AT_FDCWD, P("ry"), RENAME_EXCHANGE));
    EXPECT_TRUE("rename.exchange_swapped", !strcmp(slurp(P("ry"), buf, sizeof buf), "X")
                && !strcmp(slurp(P("rz"), buf + 128, 128), "Y"), "got %s / %s", buf, buf + 128);
    EXPECT_ERR("rename.exchange_missing_enoent", ENOENT,
               syscall(SYS_renameat2, AT_FDCWD, P("ry"), AT_FDCWD, P("nope"), RENAME_EXCHANGE));
    EXPECT_ERR("rename.missing_source_enoent", ENOENT, rename(P("nope"), P("nope2")));
    EXPECT_OK("rename.whiteout", syscall(SYS_renameat2, AT_FDCWD, P("rz"), AT_FDCWD, P("rw"),
                                         RENAME_WHITEOUT));
    lstat(P("rz"), &st);
    EXPECT_TRUE("rename.whiteout_leaves_0_0_chardev", S_ISCHR(st.st_mode) && st.st_rdev == 0,
                "mode %o rdev %llx", st.st_mode, (unsigned long long)st.st_rdev);

    /* cross-mount */
    if (other) {
        char o[4096];
        snprintf(o, sizeof o, "%s/conform-exdev", other);
        EXPECT_ERR("exdev.rename_across_mounts", EXDEV, rename(P("ry"), o));
        EXPECT_ERR("exdev.link_across_mounts", EXDEV, link(P("ry"), o));
    }

    /* truncate, fallocate, seek data/hole, copy_file_range */
    fd = open(P("data"), O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (write(fd, "abc", 3) != 3)
        fail("truncate.write", "%s", ename(errno));
    EXPECT_OK("truncate.extend", ftruncate(fd, 10));
    memset(buf, 'q', sizeof buf);
    EXPECT_EQ("truncate.extend_read_len", pread(fd, buf, 20, 0), 10);
    EXPECT_TRUE("truncate.extend_zero_fill", !memcmp(buf, "abc\0\0\0\0\0\0\0", 10), "not zero filled");
    EXPECT_OK("truncate.shrink", ftruncate(fd, 2));
    EXPECT_EQ("truncate.shrink_size", pread(fd, buf, 20, 0), 2);
    close(fd);

    static char blk[3 * 65536];
    memset(blk, 'D', sizeof blk);
    fd = open(P("fa"), O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (pwrite(fd, blk, sizeof blk, 0) != (ssize_t)sizeof blk)
        fail("fallocate.write", "%s", ename(errno));
    EXPECT_OK("fallocate.keep_size", fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 8 * 65536));
    fstat(fd, &st);
    EXPECT_EQ("fallocate.keep_size_size", st.st_size, sizeof blk);
    EXPECT_OK("fallocate.extend", fallocate(fd, 0, 0, 4 * 65536));
    fstat(fd, &st);
    EXPECT_EQ("fallocate.extend_size", st.st_size, 4 * 65536);
    EXPECT_OK("fallocate.punch_hole", fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 65536, 65536));
    memset(buf, 'q', 64);
    pread(fd, buf, 64, 65536 + 100);
    int zero = 1;
    for (int i = 0; i < 64; i++)
        zero &= buf[i] == 0;
    EXPECT_TRUE("fallocate.punch_hole_reads_zeroes", zero, "hole not zero");
    EXPECT_EQ("seek.hole_after_data", lseek(fd, 0, SEEK_HOLE), 65536);
    EXPECT_EQ("seek.data_after_hole", lseek(fd, 65536, SEEK_DATA), 2 * 65536);
    EXPECT_ERR("seek.data_past_eof_enxio", ENXIO, lseek(fd, 10 * 65536, SEEK_DATA));
    EXPECT_OK("fallocate.zero_range", fallocate(fd, FALLOC_FL_ZERO_RANGE, 2 * 65536 + 10, 100));
    pread(fd, buf, 4, 2 * 65536 + 8);
    EXPECT_TRUE("fallocate.zero_range_zeroes", buf[0] == 'D' && buf[1] == 'D' && buf[2] == 0 && buf[3] == 0,
                "got %02x %02x %02x %02x", buf[0], buf[1], buf[2], buf[3]);
    close(fd);

    put(P("cs"), "copy source data", 0644);
    int in = open(P("cs"), O_RDONLY);
    int out = open(P("cd"), O_RDWR | O_CREAT | O_TRUNC, 0644);
    loff_t oi = 5, oo = 2;
    EXPECT_EQ("copy_file_range.count", copy_file_range(in, &oi, out, &oo, 100, 0), 11);
    EXPECT_TRUE("copy_file_range.offsets_advance", oi == 16 && oo == 13, "in %lld out %lld",
                (long long)oi, (long long)oo);
    memset(buf, 'q', 32);
    EXPECT_EQ("copy_file_range.dest_size", pread(out, buf, 32, 0), 13);
    EXPECT_TRUE("copy_file_range.data", !memcmp(buf, "\0\0source data", 13), "bad copy");
    close(in);
    close(out);

    /* O_TMPFILE */
    fd = open(base, O_TMPFILE | O_RDWR, 0640);
    EXPECT_TRUE("tmpfile.open", fd >= 0, "open: %s", ename(errno));
    if (fd >= 0) {
        if (write(fd, "tmp", 3) != 3)
            fail("tmpfile.write", "%s", ename(errno));
        fstat(fd, &st);
        EXPECT_EQ("tmpfile.nlink_0", st.st_nlink, 0);
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
        EXPECT_OK("tmpfile.linkat", linkat(AT_FDCWD, proc, AT_FDCWD, P("tmpnamed"), AT_SYMLINK_FOLLOW));
        EXPECT_TRUE("tmpfile.linked_data", !strcmp(slurp(P("tmpnamed"), buf, sizeof buf), "tmp"), "got %s", buf);
        EXPECT_OCT("tmpfile.mode", fmode(P("tmpnamed")), 0640);
        close(fd);
    }
    fd = open(base, O_TMPFILE | O_RDWR | O_EXCL, 0600);
    if (fd >= 0) {
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
        EXPECT_ERR("tmpfile.excl_not_linkable", ENOENT,
                   linkat(AT_FDCWD, proc, AT_FDCWD, P("tmpexcl"), AT_SYMLINK_FOLLOW));
        close(fd);
    }
    fd = open(P("data"), O_RDWR);
    EXPECT_OK("sync.fsync", fsync(fd));
    EXPECT_OK("sync.fdatasync", fdatasync(fd));
    EXPECT_OK("sync.syncfs", syncfs(fd));
    close(fd);
    fd = open(base, O_RDONLY | O_DIRECTORY);
    EXPECT_OK("sync.fsync_directory", fsync(fd));
    close(fd);
    struct statfs sfs;
    EXPECT_TRUE("statfs.works", statfs(base, &sfs) == 0 && sfs.f_bsize > 0 && sfs.f_blocks > 0,
                "%s", ename(errno));
}

/* ------------------------------------------------------------------ xattrs */
static void suite_xattr(void)
{
    char buf[256];
    put(P("xa"), "x", 0644);
    EXPECT_OK("xattr.set", setxattr(P("xa"), "user.k", "value", 5, 0));
    EXPECT_EQ("xattr.size_probe", getxattr(P("xa"), "user.k", NULL, 0), 5);
    EXPECT_EQ("xattr.get", getxattr(P("xa"), "user.k", buf, sizeof buf), 5);
    EXPECT_ERR("xattr.get_small_buffer_erange", ERANGE, getxattr(P("xa"), "user.k", buf, 2));
    EXPECT_ERR("xattr.get_missing_enodata", ENODATA, getxattr(P("xa"), "user.none", buf, sizeof buf));
    EXPECT_ERR("xattr.create_existing_eexist", EEXIST, setxattr(P("xa"), "user.k", "v", 1, XATTR_CREATE));
    EXPECT_ERR("xattr.replace_missing_enodata", ENODATA, setxattr(P("xa"), "user.n", "v", 1, XATTR_REPLACE));
    EXPECT_OK("xattr.replace", setxattr(P("xa"), "user.k", "v2", 2, XATTR_REPLACE));
    setxattr(P("xa"), "user.second", "", 0, 0);
    ssize_t n = listxattr(P("xa"), buf, sizeof buf);
    int seen = 0;
    for (ssize_t i = 0; i < n; i += strlen(buf + i) + 1)
        seen += !strcmp(buf + i, "user.k") + !strcmp(buf + i, "user.second");
    EXPECT_EQ("xattr.list", seen, 2);
    EXPECT_EQ("xattr.empty_value", getxattr(P("xa"), "user.second", buf, sizeof buf), 0);
    EXPECT_OK("xattr.remove", removexattr(P("xa"), "user.k"));
    EXPECT_ERR("xattr.remove_missing_enodata", ENODATA, removexattr(P("xa"), "user.k"));
    symlink("xa", P("xl"));
    EXPECT_ERR("xattr.user_on_symlink_eperm", EPERM, lsetxattr(P("xl"), "user.k", "v", 1, 0));
    EXPECT_ERR("xattr.unknown_namespace_eopnotsupp", EOPNOTSUPP, setxattr(P("xa"), "bogus.k", "v", 1, 0));
}

/* ------------------------------------------------------------------ locks, two processes */
static int sync_r[2], sync_w[2]; /* parent->child, child->parent */

static void tell(int fd)
{
    if (write(fd, "!", 1) != 1)
        _exit(99);
}

static void await_(int fd)
{
    char c;
    if (read(fd, &c, 1) != 1)
        _exit(98);
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int setlk(int fd, int cmd, short type, off_t start, off_t len)
{
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
    return fcntl(fd, cmd, &fl);
}

static void lock_child(const char *path, pid_t parent)
{
    int fd = open(path, O_RDWR);
    await_(sync_r[0]); /* parent holds a write lock on [0,100) */
    EXPECT_ERR("lock.fcntl_conflict_eagain", EAGAIN, setlk(fd, F_SETLK, F_WRLCK, 50, 10));
    EXPECT_ERR("lock.fcntl_read_vs_write_eagain", EAGAIN, setlk(fd, F_SETLK, F_RDLCK, 99, 1));
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    EXPECT_OK("lock.fcntl_getlk", fcntl(fd, F_GETLK, &fl));
    EXPECT_TRUE("lock.fcntl_getlk_reports_lock", fl.l_type == F_WRLCK && fl.l_start == 0 && fl.l_len == 100,
                "type %d start %lld len %lld", fl.l_type, (long long)fl.l_start, (long long)fl.l_len);
    EXPECT_EQ("lock.fcntl_getlk_reports_holder_pid", fl.l_pid, parent);
    EXPECT_OK("lock.fcntl_disjoint_range", setlk(fd, F_SETLK, F_WRLCK, 100, 100));
    double t0 = now_s();
    tell(sync_w[1]); /* parent unlocks in 300 ms */
    EXPECT_OK("lock.fcntl_setlkw_waits_then_gets_it", setlk(fd, F_SETLKW, F_WRLCK, 0, 10));
    double waited = now_s() - t0;
    EXPECT_TRUE("lock.fcntl_setlkw_blocked_until_unlock", waited > 0.2, "waited %.3f s", waited);
    setlk(fd, F_SETLK, F_UNLCK, 0, 0);
    tell(sync_w[1]);
    await_(sync_r[0]); /* parent: read lock on [0,10) */
    EXPECT_OK("lock.fcntl_read_locks_share", setlk(fd, F_SETLK, F_RDLCK, 0, 10));
    setlk(fd, F_SETLK, F_UNLCK, 0, 0);
    tell(sync_w[1]);
    await_(sync_r[0]); /* parent: write lock via fd1, then closed another fd of the file */
    EXPECT_OK("lock.fcntl_close_of_any_fd_releases", setlk(fd, F_SETLK, F_WRLCK, 0, 10));
    setlk(fd, F_SETLK, F_UNLCK, 0, 0);
    tell(sync_w[1]);

    await_(sync_r[0]); /* parent holds flock LOCK_EX */
    int fd2 = open(path, O_RDWR);
    EXPECT_ERR("lock.flock_conflict_ewouldblock", EWOULDBLOCK, flock(fd2, LOCK_EX | LOCK_NB));
    EXPECT_ERR("lock.flock_shared_vs_exclusive", EWOULDBLOCK, flock(fd2, LOCK_SH | LOCK_NB));
    t0 = now_s();
    tell(sync_w[1]);
    EXPECT_OK("lock.flock_blocking_waits_then_gets_it", flock(fd2, LOCK_EX));
    waited = now_s() - t0;
    EXPECT_TRUE("lock.flock_blocked_until_unlock", waited > 0.2, "waited %.3f s", waited);
    flock(fd2, LOCK_UN);
    tell(sync_w[1]);
    await_(sync_r[0]); /* parent: LOCK_SH */
    EXPECT_OK("lock.flock_shared_locks_share", flock(fd2, LOCK_SH | LOCK_NB));
    flock(fd2, LOCK_UN);
    close(fd2);
    tell(sync_w[1]);
    await_(sync_r[0]); /* parent: OFD lock */
    EXPECT_ERR("lock.ofd_conflict_across_processes", EAGAIN, setlk(fd, F_OFD_SETLK, F_WRLCK, 0, 1));
    tell(sync_w[1]);
    close(fd);
}

static void suite_locks(void)
{
    const char *path = P("lockfile");
    put(path, "0123456789", 0666);
    if (pipe(sync_r) || pipe(sync_w))
        die("pipe");
    pid_t parent = getpid();
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        failures = 0;
        close(sync_r[1]);
        close(sync_w[0]);
        lock_child(path, parent);
        fflush(stdout);
        _exit(failures);
    }
    close(sync_r[0]);
    close(sync_w[1]);
    int fd = open(path, O_RDWR);
    EXPECT_OK("lock.fcntl_setlk", setlk(fd, F_SETLK, F_WRLCK, 0, 100));
    tell(sync_r[1]);
    await_(sync_w[0]);
    usleep(300000);
    setlk(fd, F_SETLK, F_UNLCK, 0, 0);
    await_(sync_w[0]);
    EXPECT_OK("lock.fcntl_read_lock", setlk(fd, F_SETLK, F_RDLCK, 0, 10));
    tell(sync_r[1]);
    await_(sync_w[0]);
    setlk(fd, F_SETLK, F_UNLCK, 0, 0);
    /* POSIX: closing any fd of the file drops the process's locks. Same process, two
     * opens: its own locks never conflict with each other. */
    int other = open(path, O_RDWR);
    EXPECT_OK("lock.fcntl_lock_via_fd1", setlk(fd, F_SETLK, F_WRLCK, 0, 10));
    EXPECT_OK("lock.fcntl_same_process_no_conflict", setlk(other, F_SETLK, F_WRLCK, 5, 10));
    close(other);
    tell(sync_r[1]);
    await_(sync_w[0]);
    EXPECT_OK("lock.flock", flock(fd, LOCK_EX));
    tell(sync_r[1]);
    await_(sync_w[0]);
    usleep(300000);
    flock(fd, LOCK_UN);
    await_(sync_w[0]);
    flock(fd, LOCK_SH);
    tell(sync_r[1]);
    await_(sync_w[0]);
    flock(fd, LOCK_UN);
    int o1 = open(path, O_RDWR), o2 = open(path, O_RDWR);
    EXPECT_OK("lock.ofd_setlk", setlk(o1, F_OFD_SETLK, F_WRLCK, 0, 1));
    EXPECT_ERR("lock.ofd_conflict_within_process", EAGAIN, setlk(o2, F_OFD_SETLK, F_WRLCK, 0, 1));
    tell(sync_r[1]);
    await_(sync_w[0]);
    close(o1);
    EXPECT_OK("lock.ofd_released_by_close", setlk(o2, F_OFD_SETLK, F_WRLCK, 0, 1));
    close(o2);
    close(fd);
    int status;
    waitpid(pid, &status, 0);
    failures += WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

/* ------------------------------------------------------------------ readdir */
struct linux_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

static int readdir_mode(const char *dir, long count)
{
    unsigned char *seen = calloc(count, 1);
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0)
        die(dir);
    static char buf[32768];
    long entries = 0, dots = 0, others = 0, batches = 0, made = 0;
    char name[64];
    for (;;) {
        long n = syscall(SYS_getdents64, fd, buf, sizeof buf);
        if (n < 0)
            die("getdents64");
        if (n == 0)
            break;
        for (long pos = 0; pos < n;) {
            struct linux_dirent64 *d = (void *)(buf + pos);
            pos += d->d_reclen;
            entries++;
            if (!strcmp(d->d_name, ".") || !strcmp(d->d_name, ".."))
                dots++;
            else if (d->d_name[0] == 'e' && strlen(d->d_name) == 7) {
                long i = atol(d->d_name + 1);
                if (i >= 0 && i < count && seen[i] < 255)
                    seen[i]++;
            } else
                others++;
        }
        /* change the directory between batches: add, rename and remove other names */
        batches++;
        snprintf(name, sizeof name, "%s/z%06ld", dir, made++);
        int c = open(name, O_WRONLY | O_CREAT, 0644);
        if (c >= 0)
            close(c);
        if (made > 2) {
            char old[64], to[64];
            snprintf(old, sizeof old, "%s/z%06ld", dir, made - 3);
            snprintf(to, sizeof to, "%s/y%06ld", dir, made - 3);
            rename(old, to);
            if (made > 4) {
                snprintf(old, sizeof old, "%s/y%06ld", dir, made - 5);
                unlink(old);
            }
        }
    }
    long missing = 0, twice = 0, first_bad = -1;
    for (long i = 0; i < count; i++) {
        if (seen[i] != 1) {
            if (first_bad < 0)
                first_bad = i;
            if (seen[i] == 0)
                missing++;
            else
                twice++;
        }
    }
    char what[64];
    snprintf(what, sizeof what, "readdir.%ld_entries_exactly_once", count);
    EXPECT_TRUE(what, missing == 0 && twice == 0,
                "expected each once, got %ld missing and %ld repeated (first e%06ld) in %ld batches",
                missing, twice, first_bad, batches);
    EXPECT_EQ("readdir.dot_and_dotdot_once", dots, 2);
    EXPECT_TRUE("readdir.changed_while_listing", batches > 3, "only %ld batches", batches);
    (void)others;
    close(fd);
    /* clean up the extra names */
    for (long i = 0; i < made; i++) {
        snprintf(name, sizeof name, "%s/z%06ld", dir, i);
        unlink(name);
        snprintf(name, sizeof name, "%s/y%06ld", dir, i);
        unlink(name);
    }
    free(seen);
    return failures;
}

/* ------------------------------------------------------------------ deleted directory */
static int holddir_mode(const char *dir, const char *go)
{
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    if (dfd < 0)
        die(dir);
    static char buf[8192];
    if (syscall(SYS_getdents64, dfd, buf, sizeof buf) < 0)
        die("getdents64");
    printf("READY\n");
    fflush(stdout);
    struct stat st;
    for (int i = 0; i < 1200 && stat(go, &st) < 0; i++)
        usleep(50000);
    usleep(1500000); /* let cached attributes and entries expire (cache=auto: 1 s) */
    lseek(dfd, 0, SEEK_SET);
    EXPECT_ERR("deleted_dir.getdents_enoent", ENOENT, syscall(SYS_getdents64, dfd, buf, sizeof buf));
    EXPECT_ERR("deleted_dir.create_enoent", ENOENT, openat(dfd, "new", O_WRONLY | O_CREAT, 0644));
    EXPECT_ERR("deleted_dir.mkdir_enoent", ENOENT, mkdirat(dfd, "newdir", 0755));
    EXPECT_ERR("deleted_dir.old_entry_enoent", ENOENT, openat(dfd, "before", O_RDONLY));
    EXPECT_OK("deleted_dir.fstat", fstat(dfd, &st));
    EXPECT_EQ("deleted_dir.nlink_0", st.st_nlink, 0);
    EXPECT_OK("deleted_dir.fchdir", fchdir(dfd));
    EXPECT_ERR("deleted_dir.cwd_create_enoent", ENOENT, open("x", O_WRONLY | O_CREAT, 0644));
    close(dfd);
    printf("DONE\n");
    return failures;
}

/* ------------------------------------------------------------------ locks seen elsewhere */
static int lockhold_mode(const char *path, const char *go)
{
    int fd = open(path, O_RDWR), fd2 = open(path, O_RDWR);
    if (fd < 0 || fd2 < 0)
        die(path);
    if (setlk(fd, F_SETLK, F_WRLCK, 0, 10) < 0)
        die("F_SETLK");
    if (flock(fd2, LOCK_EX | LOCK_NB) < 0)
        die("flock");
    printf("READY\n");
    fflush(stdout);
    struct stat st;
    for (int i = 0; i < 1200 && stat(go, &st) < 0; i++)
        usleep(50000);
    printf("DONE\n");
    return 0;
}

static int trylock_mode(const char *path)
{
    int fd = open(path, O_RDWR), fd2 = open(path, O_RDWR);
    if (fd < 0 || fd2 < 0)
        die(path);
    int r = setlk(fd, F_SETLK, F_WRLCK, 0, 10);
    printf("fcntl %s\n", r == 0 ? "FREE" : errno == EAGAIN || errno == EACCES ? "LOCKED" : ename(errno));
    r = flock(fd2, LOCK_EX | LOCK_NB);
    printf("flock %s\n", r == 0 ? "FREE" : errno == EWOULDBLOCK ? "LOCKED" : ename(errno));
    return 0;
}

/* ------------------------------------------------------------------ main */
static void usage(void)
{
    fprintf(stderr, "usage: conform suite DIR [-u UID:GID] [-g GID] [-m OTHER] [-x]\n"
                    "       conform readdir DIR COUNT\n"
                    "       conform holddir DIR GOFILE\n"
                    "       conform lockhold FILE GOFILE\n"
                    "       conform trylock FILE\n");
    exit(2);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    if (argc < 3)
        usage();
    if (!strcmp(argv[1], "readdir") && argc == 4)
        return readdir_mode(argv[2], atol(argv[3]));
    if (!strcmp(argv[1], "holddir") && argc == 4)
        return holddir_mode(argv[2], argv[3]);
    if (!strcmp(argv[1], "lockhold") && argc == 4)
        return lockhold_mode(argv[2], argv[3]);
    if (!strcmp(argv[1], "trylock") && argc == 3)
        return trylock_mode(argv[2]);
    if (strcmp(argv[1], "suite"))
        usage();
    const char *other = NULL;
    int xattrs = 0;
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "-u") && i + 1 < argc)
            sscanf(argv[++i], "%u:%u", &U, &G);
        else if (!strcmp(argv[i], "-g") && i + 1 < argc)
            X = (gid_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "-m") && i + 1 < argc)
            other = argv[++i];
        else if (!strcmp(argv[i], "-x"))
            xattrs = 1;
        else
            usage();
    }
    umask(022);
    snprintf(base, sizeof base, "%s/conform", argv[2]);
    rmtree(base);
    if (mkdir(base, 0755) < 0)
        die(base);
    suite_perm();
    suite_open();
    suite_files(other);
    if (xattrs)
        suite_xattr();
    suite_locks();
    printf("%d failures\n", failures);
    return failures > 99 ? 99 : failures;
}
