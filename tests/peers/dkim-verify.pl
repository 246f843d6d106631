#!/usr/bin/perl
# Verify every DKIM and DomainKey signature of the message on stdin with Mail::DKIM, the
# public keys coming from a JSON file (name => TXT value) instead of DNS: no socket is opened.
# Prints one line per signature: "<DKIM|DK> <domain> <selector> <result> (<detail>)",
# then "overall <result>".
use strict;
use warnings;
use JSON::PP;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Packet;
use Net::DNS::RR;

package LocalResolver;
sub new { my ($class, $records) = @_; return bless { records => $records, error => '' }, $class; }
sub errorstring { return $_[0]{error}; }
sub send {
    my ($self, $name, $type) = @_;
    $name =~ s/\.$//;
    my $packet = Net::DNS::Packet->new($name, $type);
    $packet->header->qr(1);
    my $value = $self->{records}{lc $name};
    if (!defined $value) {
        $packet->header->rcode('NXDOMAIN');
        return $packet;
    }
    my @strings = unpack('(A255)*', $value);
    $packet->push(answer => Net::DNS::RR->new(name => $name, type => 'TXT', ttl => 60,
                                              txtdata => \@strings));
    return $packet;
}

package main;
open(my $fh, '<', $ARGV[0]) or die "cannot read $ARGV[0]: $!";
my $records = decode_json(do { local $/; <$fh> });
my %lower = map { lc($_) =~ s/\.$//r => $records->{$_} } keys %$records;
Mail::DKIM::DNS::resolver(LocalResolver->new(\%lower));
binmode STDIN;
my $verifier = Mail::DKIM::Verifier->new();
while (read(STDIN, my $block, 1 << 20)) { $verifier->PRINT($block); }
$verifier->CLOSE();
foreach my $sig ($verifier->signatures) {
    my $kind = ref($sig) =~ /DkSignature/ ? 'DK' : 'DKIM';
    printf "%s %s %s %s (%s)\n", $kind, $sig->domain, $sig->selector, $sig->result,
        $sig->result_detail;
}
print "overall ", $verifier->result, "\n";
