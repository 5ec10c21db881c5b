/* runas UID GID CMD [ARG...]: run CMD with the given uid/gid and no supplementary groups,
 * so guest tests can act as an unprivileged user (busybox has no setpriv). */
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: runas UID GID CMD [ARG...]\n");
        return 2;
    }
    uid_t uid = (uid_t)strtoul(argv[1], NULL, 10);
    gid_t gid = (gid_t)strtoul(argv[2], NULL, 10);
    if (setgroups(0, NULL) || setgid(gid) || setuid(uid)) {
        perror("runas");
        return 126;
    }
    execvp(argv[3], argv + 3);
    perror("runas: exec");
    return 127;
}
