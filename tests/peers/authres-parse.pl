#!/usr/bin/perl
# Parse the Authentication-Results header on stdin with Mail::AuthenticationResults (an
# independent RFC 8601 parser; Debian installs it with libmail-dkim-perl) and print JSON:
# {"id": authserv-id, "results": [[method, result, [[property, value], ...]], ...]}.
use strict;
use warnings;
use JSON::PP;
use Mail::AuthenticationResults::Parser;

local $/;
my $parsed = Mail::AuthenticationResults::Parser->new()->parse(scalar <STDIN>);
my @results;
for my $entry (@{ $parsed->children() }) {
    my @properties = map { [ $_->key, $_->value ] }
        grep { ref($_) !~ /Comment/ } @{ $entry->children() };
    push @results, [ $entry->key, $entry->value, \@properties ];
}
print JSON::PP->new->canonical->encode({ id => $parsed->value->value, results => \@results }),
    "\n";
